"""Shards: a source written as WebDataset shards plus ``manifest.json``, and read back.

- :mod:`~upstream.shards.stage`: the stage's config and the stage (checks, plan, k-shot lists,
  the manifest, continuation, its MLflow run);
- :mod:`~upstream.shards.captioning`: every sample's ``txt``, a source's own caption or a
  template;
- :mod:`~upstream.shards.encode`: what each image becomes in a shard (resize, corruption,
  encoding, caption, metadata);
- :mod:`~upstream.shards.workerpool`: the encoding processes, their results in order;
- :mod:`~upstream.shards.writer`: encoded samples into tar shards, in order, uploaded behind;
- :mod:`~upstream.shards.tars`: tar shards byte for byte as webdataset's ``TarWriter`` writes
  them, faster;
- :mod:`~upstream.shards.tarread`: a strict streaming reader of tar shards;
- :mod:`~upstream.shards.loader`: the one reader of shard sets for every stage (the
  manifest, :func:`~upstream.shards.loader.load_split`, labels, k-shot indices,
  :class:`~upstream.shards.loader.Stream`).

Nothing is imported here, so that a config parses without the reader's torch.
"""
