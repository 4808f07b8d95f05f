"""Samples/s of upstream's whole pre-training step against the bare compute of the same step.

    .venv/bin/python benchmarks/pretrain.py [--quick] [--method clip|simclr|supervised]
        [--no-simclr-vs-clip] [--simclr-per-image] [--projection-hidden N]

- ``step``: :func:`upstream.pretrain.pretrain` on shards in the local S3 server (SeaweedFS,
  started here in a temporary ``UPSTREAM_HOME`` and stopped at the end): the loader with one
  worker process, the loss, AdamW, the schedule, per-step metrics to MLflow; its steady
  samples/s (the first step left out) and the share of step time spent waiting for data,
  as the stage itself measures them;
- ``bare``: the same model, loss, optimizer and batch size on tensors already in memory
  (random images of the shards' size; for clip, the captions tokenized once): nothing but
  forward, backward and the optimizer step;
- ``step on batches in memory``: :func:`upstream.pretrain.pretrain` again, its loader replaced
  by one in-memory batch given again and again: the whole step but the loader, which tells the
  loader's share of the gap from the loop's own (schedule, logging, MLflow);
- ``simclr`` against ``clip`` (unless ``--no-simclr-vs-clip``): each round also runs the
  ``step`` of the method that ``--method`` is not, right after the round's own, on the same
  tower, shards, batch and loader, and both methods' ``bare``; SimCLR's step includes making
  its two views (:class:`upstream.pretrain.augment.BatchViews`, on the batch in the training
  process). ``--simclr-per-image`` adds a SimCLR step with the per-image reference views
  (torchvision on each PIL image, in the loader's worker: what the stage did before, and
  still does for shards whose images differ in size).

All of them run in this one process, with torch's default threads and the allocator setting the
training stages use (:func:`upstream.allocator.keep_freed_memory`), on a tiny config
(``--model``, default ``upstream-tiny-rn``, 32 px) on the CPU. After a warm-up round, each is
run ``--repeats`` times, alternating; the ratios are the medians of the per-round ratios (the
runs of a round are seconds apart, under the same load from whatever else runs on the
machine), the data-wait share the median of the rounds'. Prints the figures and the loader
worker's CPU per sample, then ``ratio step_vs_bare``, ``ratio data_wait_share``,
``ratio step_in_memory_vs_bare``, ``ratio simclr_vs_clip_step`` (the goal: SimCLR's step
over CLIP's), ``ratio simclr_vs_clip_bare`` (the same for the bare compute: the methods'
compute alone), ``ratio simclr_step_vs_bare`` (what SimCLR's views and loader cost) and,
with ``--simclr-per-image``, ``ratio simclr_per_image_vs_clip_step``.

Where the time goes on 2 cores (README, "Benchmarks"): the step on in-memory batches runs at
0.97-1.00 of bare, so the loop itself costs next to nothing; the gap is the loader's CPU
(~50 us per 32-px sample in steady state: tar reading, PNG decoding, the S3 GET, batching),
which has to come out of the two cores torch's intra-op threads already fill.

SimCLR, per batch of 64 (32 px): its per-image views cost ~70 ms of the worker's CPU (~1.1
ms an image for two views: colour jitter ~160 us and blur ~260 us a view when applied, the
crop ~40, ToTensor ~18; decoding ~12 us an image), which came out of the step's cores
(simclr_per_image_vs_clip_step 0.20-0.22); the batched views cost ~6-10 ms in the training
process. What remained was SimCLR's compute: with SLIP's 4096-wide head its bare step was
~180-200 ms against CLIP's ~48 (the head ~110-125 ms of it), so simclr_vs_clip_step stayed at
0.28-0.31. The stage's head is now as wide as the tower's features (SimCLR's sizing; 64 on
upstream-tiny-rn) and AdamW is fused: simclr_vs_clip_step 0.72 (2026-12-01, README).
``--projection-hidden 4096`` measures SLIP's head again.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from upstream import allocator, models, services, storage
from upstream.pretrain import stage
from upstream.pretrain.stage import Objective, PretrainConfig, pretrain
from upstream.shards import loader
from upstream.shards.stage import ShardConfig, shard

MODEL = "upstream-tiny-rn"  # the default of --model


def bare(config: PretrainConfig, steps: int, image_size: int, captions: list[str]) -> float:
    """Samples/s of forward + backward + AdamW on in-memory tensors (first step left out)."""
    from upstream import training
    from upstream.pretrain import distributed

    world = distributed.init()
    torch.manual_seed(0)
    net = models.build_pretrain_model(config.model, config.method, 8,
                                      projection_hidden=config.projection_hidden,
                                      projection_out=config.projection_dim)
    tokenizer = models.tokenizer(config.model) if config.method == "clip" else None
    loss_module = Objective.build(config, net, world, tokenizer)
    optimizer = training.make_optimizer(net, config.lr, config.weight_decay,
                                        vit=models.tower_is_vit(config.model))
    b = config.batch_size
    shape = (b, 2, 3, image_size, image_size) if config.method == "simclr" else (
        b, 3, image_size, image_size)
    images = torch.rand(shape)
    labels = torch.randint(0, 8, (b,))
    tokens = tokenizer(captions[:b]) if tokenizer is not None else None
    net.train()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = loss_module(images, labels, tokens)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - t)
    return b * (len(times) - 1) / sum(times[1:])


@contextlib.contextmanager
def batches_in_memory(method: str, image_size: int, captions: list[str]) -> Iterator[None]:
    """Within it, :func:`pretrain` takes its batches from memory (one batch of random images
    of the shards' size, given again and again) instead of reading shards: the whole step but
    the loader, to tell the loader's share of the gap from the loop's own (logging, schedule,
    MLflow)."""

    def epochs(self: loader.Stream, epoch: int = 0, start: int = 0) -> Iterator[Any]:
        st = self.settings
        # SimCLR's batches too are images as stored: the stage makes the two views.
        images = torch.rand(st.batch_size, 3, image_size, image_size)
        labels = torch.randint(0, len(self.manifest["class_names"]), (st.batch_size,))
        text = (st.tokenizer(captions[: st.batch_size]) if st.tokenizer is not None
                else [""] * st.batch_size)
        index = start
        while True:
            yield epoch, index, (images, labels, text)
            index += 1

    with mock.patch.object(loader.Stream, "epochs", epochs):
        yield


def children_cpu() -> float:
    """CPU seconds of this process's ended children: the loader's workers, once stopped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", choices=["clip", "simclr", "supervised"], default="clip")
    ap.add_argument("--model", default=MODEL, help="a 32 px config (default %(default)s)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="20 steps, 2 repeats")
    ap.add_argument("--no-simclr-vs-clip", dest="simclr_vs_clip", action="store_false",
                    help="skip the SimCLR-against-CLIP runs of each round")
    ap.add_argument("--projection-hidden", type=int, default=0,
                    help="simclr: the projection head's width (default 0: the features' "
                    "width, the stage's default, as SimCLR sizes it; SLIP's is 4096)")
    ap.add_argument("--simclr-per-image", action="store_true",
                    help="also run SimCLR with its per-image views in the loader (the "
                    "reference) each round: ratio simclr_per_image_vs_clip_step")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 20, 2

    # A SIGTERM ends the run through the finally below: the services stop, the folder goes.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    tmp = Path(tempfile.mkdtemp(prefix="upstream-bench-pretrain-"))
    os.environ["UPSTREAM_HOME"] = str(tmp / "home")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    info = None
    try:
        allocator.keep_freed_memory()  # as pretrain() sets it: bare runs with it too
        info = services.up(tmp / "home")
        services.apply_env(info, override=True)
        storage._client.cache_clear()
        uri = f"{services.DATA_ROOT}/bench-pretrain/train"
        samples = 2048
        manifest = shard(ShardConfig.parse(
            source="shapes", num_classes=8, samples_per_class=samples // 8, image_size=32,
            output=uri, min_shards=16, experiment="bench-pretrain",
        ))
        print(f"sharded {manifest['num_samples']} 32 px images into {len(manifest['shards'])} "
              f"shards on {uri}")
        captions = [f"a photo of a {c}." for c in manifest["class_names"]] * args.batch_size
        base = dict(data=uri, method=args.method, model=args.model, batch_size=args.batch_size,
                    train_samples=args.steps * args.batch_size, num_workers=1,
                    projection_hidden=args.projection_hidden, experiment="bench-pretrain",
                    resume="never")
        steps_s: list[float] = []
        shares: list[float] = []
        bares: list[float] = []
        in_memory: list[float] = []
        worker_cpu: list[float] = []  # the loader worker's CPU seconds per sample
        # SimCLR against CLIP, same tower, data, batch and loader, a pair per round: the step
        # runs of the round's --method are reused, the other method's runs are added.
        method_steps: dict[str, list[float]] = {"clip": [], "simclr": []}
        method_bares: dict[str, list[float]] = {"clip": [], "simclr": []}
        per_image: list[float] = []  # --simclr-per-image: SimCLR with the per-image views
        # A warm-up round, not counted: the first call pays one-off costs (lazy imports and
        # initialisation, the allocator's first growth, the S3 server's first reads).
        warm = PretrainConfig.parse(**base | {"train_samples": 4 * args.batch_size},
                                    output=str(tmp / "warm-up"))
        pretrain(warm)
        bare(warm, 4, 32, captions)
        for r in range(args.repeats):
            config = PretrainConfig.parse(**base, output=str(tmp / f"run-{r}"), seed=r)
            before = children_cpu()
            result = pretrain(config)
            worker_cpu.append((children_cpu() - before) / (result["steps"] * args.batch_size))
            steps_s.append(result["samples_per_s"])
            shares.append(result["data_wait_share"])
            # The other method's step right after this one (the pair sees the same load), then
            # SimCLR with its per-image views; the bare runs after all the steps.
            others = {m: PretrainConfig.parse(**base | {"method": m}, output=str(tmp / f"{m}-{r}"),
                                              seed=r)
                      for m in ("clip", "simclr") if args.simclr_vs_clip and m != args.method}
            for method, other in others.items():
                method_steps[method].append(pretrain(other)["samples_per_s"])
            if args.simclr_vs_clip and args.simclr_per_image:
                # The reference transform in the loader's worker, image by image (what the
                # stage does with images of several sizes).
                other = PretrainConfig.parse(**base | {"method": "simclr"},
                                             output=str(tmp / f"per-image-{r}"), seed=r)
                with mock.patch.object(stage, "_one_size", lambda manifest: False):
                    per_image.append(pretrain(other)["samples_per_s"])
            bares.append(bare(config, args.steps, 32, captions))
            with batches_in_memory(args.method, 32, captions):
                in_memory.append(pretrain(config.model_copy(
                    update={"output": str(tmp / f"in-memory-{r}")}))["samples_per_s"])
            print(f"round {r + 1}: step {steps_s[-1]:.0f} samples/s (data wait "
                  f"{shares[-1]:.1%}), bare {bares[-1]:.0f} samples/s, the step on batches "
                  f"in memory {in_memory[-1]:.0f} samples/s", flush=True)
            if not args.simclr_vs_clip:
                continue
            for method, other in others.items():
                method_bares[method].append(bare(other, args.steps, 32, captions))
            if args.method in method_steps:
                method_steps[args.method].append(steps_s[-1])
                method_bares[args.method].append(bares[-1])
            print(f"round {r + 1}: simclr step {method_steps['simclr'][-1]:.0f} samples/s, "
                  f"bare {method_bares['simclr'][-1]:.0f}; clip step "
                  f"{method_steps['clip'][-1]:.0f} samples/s, bare "
                  f"{method_bares['clip'][-1]:.0f}"
                  + (f"; simclr with per-image views {per_image[-1]:.0f} samples/s"
                     if per_image else ""), flush=True)
        print(f"\nmethod {args.method}, model {args.model}, batch {args.batch_size}, "
              f"{args.steps} steps, {torch.get_num_threads()} threads, {args.repeats} rounds")
        print(f"step  {max(steps_s):8.0f} samples/s (median {statistics.median(steps_s):.0f})")
        print(f"bare  {max(bares):8.0f} samples/s (median {statistics.median(bares):.0f})")
        print(f"step on batches in memory {max(in_memory):8.0f} samples/s "
              f"(median {statistics.median(in_memory):.0f})")
        print(f"data wait share {statistics.median(shares):.3f} (best {min(shares):.3f})")
        per_sample = statistics.median(worker_cpu)
        print(f"loader worker CPU {per_sample * 1e6:.0f} us a sample (whole runs: start, "
              f"reading, decoding, sending), {per_sample * statistics.median(steps_s):.1%} of "
              "a core at the step's rate")
        print()
        paired = statistics.median(a / b for a, b in zip(steps_s, bares, strict=True))
        no_loader = statistics.median(a / b for a, b in zip(in_memory, bares, strict=True))
        print(f"ratio step_vs_bare {paired:.2f}")
        print(f"ratio data_wait_share {statistics.median(shares):.3f}")
        print(f"ratio step_in_memory_vs_bare {no_loader:.2f}")
        if args.simclr_vs_clip:
            steps_of, bares_of = method_steps, method_bares

            def per_round(a: list[float], b: list[float]) -> float:
                return statistics.median(x / y for x, y in zip(a, b, strict=True))

            print(f"ratio simclr_vs_clip_step "
                  f"{per_round(steps_of['simclr'], steps_of['clip']):.2f}")
            print(f"ratio simclr_vs_clip_bare "
                  f"{per_round(bares_of['simclr'], bares_of['clip']):.2f}")
            print(f"ratio simclr_step_vs_bare "
                  f"{per_round(steps_of['simclr'], bares_of['simclr']):.2f}")
            if per_image:
                print(f"ratio simclr_per_image_vs_clip_step "
                      f"{per_round(per_image, steps_of['clip']):.2f}")
    finally:
        if info is not None:
            services.down(tmp / "home")
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
