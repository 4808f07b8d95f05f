"""What a fine-tuning grid saves by doing things once, against doing them per configuration.

    .venv/bin/python benchmarks/finetune.py [--quick]

All on the digits (scikit-learn's, 32 px, all 1437 training images) and a tiny CLIP tower
(``upstream-tiny-rn``) pre-trained here for a few steps, in a temporary ``UPSTREAM_HOME`` with a
SQLite MLflow store, on the CPU:

- ``lp_grid_cached_vs_per_config``: LP over 4 k × 3 seeds × the probe's C grid (20 points,
  each chosen on the validation split) with the features read from the stored cache, against
  the same grid where every configuration (k, seed, C) reads its images from the shards and
  runs the tower on them, as a per-configuration script would. Both fit with the same probe
  code; the cached grid's C path is warm-started, one fit per C as on the other side.
  (``lp_grid_cached_vs_per_kseed`` also prints the weaker baseline that extracts once per
  (k, seed), as upstream did before the cache.)
- ``grid_call_vs_separate_calls``: an ``lp-ft`` grid of 4 k × 3 seeds × 2 learning rates in one
  ``upstream finetune`` process, against the same 24 models made by 24 ``upstream finetune``
  processes of one (k, seed, lr) each: start-up, imports, reading the data and the
  checkpoint, MLflow set-up and the probe are paid once. Training is short (2 epochs), so the
  ratio measures the overheads, which is what it is about.
- ``extract_vs_bare_forward``: :func:`upstream.finetune.extract_features` against the bare
  tower's forward pass (``torch.no_grad``, same batches) on the same in-memory tensors.

Each timed part runs ``--repeats`` times alternating with its baseline; ratios are medians of
the per-round ratios (baseline time / upstream's time, so > 1 means upstream is faster).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _setup(home: Path) -> tuple[str, str]:
    from upstream.pretrain import PretrainConfig, pretrain
    from upstream.shards.stage import ShardConfig, shard

    data = str(home / "digits")
    shard(ShardConfig.parse(source="digits", image_size=32, output=data, experiment="bench"))
    pre = pretrain(PretrainConfig.parse(
        data=data, output=str(home / "pt"), method="clip", epochs=1, batch_size=64,
        experiment="bench"))
    return data, pre["checkpoint"]


def lp_grid(data: str, ckpt_uri: str, cache: str, shots: list[int], seeds: list[int],
            c_grid: list[float], val: int) -> tuple[float, float, float]:
    """(cached, per (k, seed), per configuration) seconds for the same LP grid."""
    from upstream import models
    from upstream.finetune import features, splits
    from upstream.finetune.probe import fit_probe
    from upstream.shards import loader

    ckpt = models.load_checkpoint(ckpt_uri)
    manifest = loader.read_manifest(data)
    labels = loader.load_labels(data).numpy()
    tower = features.tower_fingerprint(ckpt["visual"])
    encoder = models.encoder_from_state(ckpt["model_name"], ckpt["visual"])
    grid = [(k, s, splits.draw(labels, k, s, val)) for k in shots for s in seeds]

    def cached() -> tuple[torch.Tensor, bool]:
        return features.cached_features(
            encoder, lambda: loader.load_split(data)[0], len(labels), tower=tower,
            data=manifest["fingerprint"], model_name=ckpt["model_name"], cache=cache)

    cached()  # a previous call stored them: this grid finds them there
    t = time.perf_counter()
    feats, hit = cached()
    assert hit
    f = feats.numpy().astype(np.float64)
    for _, _, sp in grid:
        fit_probe(f[sp.train], labels[sp.train], 10, c_grid, f[sp.val], labels[sp.val])
    cached_s = time.perf_counter() - t

    def extract(idx: np.ndarray) -> np.ndarray:
        images, _, _ = loader.load_split(data, indices=idx.tolist())
        return features.extract_features(encoder, images).numpy().astype(np.float64)

    t = time.perf_counter()
    for _, _, sp in grid:
        ft, fv = extract(sp.train), extract(sp.val)
        fit_probe(ft, labels[sp.train], 10, c_grid, fv, labels[sp.val])
    per_kseed = time.perf_counter() - t

    t = time.perf_counter()
    for _, _, sp in grid:
        for c in c_grid:
            ft, fv = extract(sp.train), extract(sp.val)
            fit_probe(ft, labels[sp.train], 10, [c], fv, labels[sp.val])
    per_config = time.perf_counter() - t
    return cached_s, per_kseed, per_config


def grid_vs_calls(data: str, ckpt: str, home: Path, shots: list[int], seeds: list[int],
                  lrs: list[str]) -> tuple[float, float]:
    common = ["--pretrained", ckpt, "--data", data, "--modes", "lp-ft", "--epochs", "2",
              "--min-steps", "0", "--probe-c-points", "5", "--experiment", "bench-calls"]
    env = {**os.environ, "UPSTREAM_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "upstream", "finetune"]

    def run(args: list[str]) -> None:
        subprocess.run(cmd + common + args, env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    out = home / f"grid-{time.time_ns()}"
    t = time.perf_counter()
    run(["--output", str(out), "--shots", ",".join(map(str, shots)), "--seeds",
         ",".join(map(str, seeds)), "--lrs", ",".join(lrs)])
    one = time.perf_counter() - t
    t = time.perf_counter()
    for k in shots:
        for s in seeds:
            for lr in lrs:
                run(["--output", str(out) + f"-{k}-{s}-{lr}", "--shots", str(k), "--seeds",
                     str(s), "--lrs", lr])
    separate = time.perf_counter() - t
    return one, separate


def extract_vs_bare(data: str, ckpt_uri: str, rounds: int) -> float:
    from upstream import models
    from upstream.finetune.features import FEATURE_BATCH, extract_features
    from upstream.shards import loader

    ckpt = models.load_checkpoint(ckpt_uri)
    encoder = models.encoder_from_state(ckpt["model_name"], ckpt["visual"]).eval()
    images, _, _ = loader.load_split(data)
    ratios = []
    for _ in range(rounds):
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(images), FEATURE_BATCH):
                encoder(images[i : i + FEATURE_BATCH])
        bare = time.perf_counter() - t
        t = time.perf_counter()
        extract_features(encoder, images)
        ours = time.perf_counter() - t
        ratios.append(bare / ours)
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 k × 2 seeds, fewer rounds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shots = [1, 5] if args.quick else [1, 5, 10, 0]
    seeds = [0, 1] if args.quick else [0, 1, 2]
    lrs = ["1e-4", "1e-3"]
    repeats = 1 if args.quick else args.repeats
    home = Path(tempfile.mkdtemp(prefix="upstream-bench-ft-"))
    os.environ["UPSTREAM_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    from upstream import allocator
    from upstream.finetune import FinetuneConfig
    from upstream.logs import setup_logging

    setup_logging()
    allocator.keep_freed_memory()
    try:
        data, ckpt = _setup(home)
        cache = str(home / "cache")
        c_grid = FinetuneConfig.parse(data="-", pretrained="-", probe_c_points=20).c_grid
        lp = [lp_grid(data, ckpt, cache, shots, seeds, c_grid, 10) for _ in range(repeats)]
        for cached, per_kseed, per_config in lp:
            print(f"LP grid {len(shots)} k × {len(seeds)} seeds × {len(c_grid)} C: cached "
                  f"{cached:.1f} s, extracting per (k, seed) {per_kseed:.1f} s, per "
                  f"configuration {per_config:.1f} s")
        calls = [grid_vs_calls(data, ckpt, home, shots, seeds, lrs) for _ in range(repeats)]
        n = len(shots) * len(seeds) * len(lrs)
        for one, separate in calls:
            print(f"lp-ft grid of {n} models: one call {one:.1f} s, {n} separate calls "
                  f"{separate:.1f} s")
        extract = extract_vs_bare(data, ckpt, 5 if args.quick else 15)
        print(f"ratio lp_grid_cached_vs_per_config "
              f"{statistics.median(c / a for a, _, c in lp):.2f}")
        print(f"ratio lp_grid_cached_vs_per_kseed "
              f"{statistics.median(b / a for a, b, _ in lp):.2f}")
        print(f"ratio grid_call_vs_separate_calls "
              f"{statistics.median(s / o for o, s in calls):.2f}")
        print(f"ratio extract_vs_bare_forward {extract:.2f}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
