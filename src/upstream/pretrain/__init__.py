"""Pre-training: one image tower by ``clip``, ``simclr`` or ``supervised``, on one process,
many (torchrun) or many nodes (a Kubeflow PyTorchJob).

- :mod:`~upstream.pretrain.stage`: the stage's config and the training loop;
- :mod:`~upstream.pretrain.objectives`: SimCLR's NT-Xent with its projection head, and
  CLIP's loss;
- :mod:`~upstream.pretrain.augment`: the three methods' training-time image transforms;
- :mod:`~upstream.pretrain.trainstate`: resumable training state, to go on exactly where a
  run stopped;
- :mod:`~upstream.pretrain.distributed`: the data-parallel processes that torchrun starts;
- :mod:`~upstream.pretrain.job`: a multi-node run as a PyTorchJob, from the pipeline step;
- :mod:`~upstream.pretrain.pytorchjob`: the PyTorchJob manifest, its submission and the wait.

``python -m upstream.pretrain CONFIG.json`` runs one training process (what torchrun starts).
Importing this package does not import torch.
"""

from upstream.pretrain.stage import PretrainConfig, pretrain

__all__ = ["PretrainConfig", "pretrain"]
