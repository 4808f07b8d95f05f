"""Images/s of upstream's loader vs torchvision's ImageFolder and vs the bound of decoding only.

    .venv/bin/python benchmarks/loader.py [--quick] [--images N] [--workers W] [--batch-size B]

Three readers of the same JPEG bytes, with the same transform (RandomResizedCrop(224) then
ToTensor: PIL → float CHW), the same number of worker processes and the same batch size:

- ``loader``: :class:`upstream.shards.loader.Stream` over upstream shards on the local S3 server
  (SeaweedFS, started here in a temporary ``UPSTREAM_HOME`` and stopped at the end);
- ``imagefolder``: ``torchvision.datasets.ImageFolder`` + ``torch.utils.data.DataLoader``
  (``shuffle=True``) over the same images as files on local disk;
- ``decode_bound``: only decoding + transforming the images from bytes already in memory,
  in as many processes (a fork pool, one torch thread each, as DataLoader workers have),
  results discarded: no file or network reading, no batching, no transfer between processes.

The loader does ToTensor's conversion straight into its batch buffers (the same numbers, as
tests/test_loader.py checks); the other two call torchvision's ToTensor. The shards are
written by the shard stage (``imagefolder:`` source, JPEG), and the ImageFolder files are
then extracted from the shards, so all three read byte-identical images. Each reader starts
its processes once and keeps them across epochs (``Stream.set_epoch``, DataLoader's
``persistent_workers``, one pool); the first epoch of each is a warm-up, left out; then
``--repeats`` rounds run the three back to back (rotating the order).
The ratios are the medians of the per-round ratios: the three readers of one round ran within
seconds of each other, under the same load from whatever else runs on the machine, which the
best or median epoch of each reader taken apart does not ensure. Best and median images/s are
printed too, and CPU ms/image (all processes of a reader, the S3 server's included for the
loader), which other load on the machine disturbs less.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageDraw
from torchvision import datasets
from torchvision import transforms as T

from upstream import services, storage
from upstream.shards import loader
from upstream.shards.stage import ShardConfig, shard

SIDE = 256
CLASSES = 10

# Set before the decode-bound pool forks, so that its processes inherit them (no pickling).
_BYTES: list[bytes] = []
_TRANSFORM: Callable[[Image.Image], torch.Tensor] | None = None


def make_transform() -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose([T.RandomResizedCrop(224), T.ToTensor()])


def synthetic_image(rng: np.random.Generator) -> Image.Image:
    """A smooth gradient, a dozen filled ellipses and mild noise: JPEGs of a natural-ish size
    (~20 KB at 256², quality 90), unlike flat colours (tiny) or white noise (huge)."""
    x = np.linspace(0.0, 1.0, SIDE)
    base = (np.outer(x, x)[..., None] * rng.uniform(0, 255, 3)).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        a, b = rng.integers(0, SIDE, 2), rng.integers(0, SIDE, 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse([*np.minimum(a, b), *np.maximum(a, b)], fill=colour)
    noisy = np.asarray(img).astype(np.int16) + rng.integers(-12, 12, (SIDE, SIDE, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_source(folder: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        cls_dir = folder / f"class_{i % CLASSES:02d}"
        cls_dir.mkdir(parents=True, exist_ok=True)
        synthetic_image(rng).save(cls_dir / f"img_{i:06d}.jpg", format="JPEG", quality=90)


def extract_imagefolder(uri: str, folder: Path) -> list[bytes]:
    """The shards' images as an ImageFolder (class folders from ``cls``); returns the bytes."""
    manifest = loader.read_manifest(uri)
    out: list[bytes] = []
    for url, info in zip(loader.shard_urls(uri, manifest), manifest["shards"], strict=True):
        for sample in loader.read_shard(url, info):
            data = sample["jpg"]
            cls_dir = folder / f"class_{int(sample['cls']):02d}"
            cls_dir.mkdir(parents=True, exist_ok=True)
            (cls_dir / f"{sample['__key__']}.jpg").write_bytes(data)
            out.append(data)
    return out


def cpu_seconds(services_pids: set[int], s3_server: psutil.Process | None) -> float:
    """CPU time of this process and its worker processes (alive or reaped), and of
    ``s3_server`` if given; the local services' processes are not workers."""
    me = psutil.Process()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = sum(me.cpu_times()[:2]) + kids.ru_utime + kids.ru_stime
    services_tree = set(services_pids)
    for pid in services_pids:
        with contextlib.suppress(psutil.Error):
            services_tree |= {p.pid for p in psutil.Process(pid).children(recursive=True)}
    for child in me.children(recursive=True):
        if child.pid not in services_tree:
            with contextlib.suppress(psutil.Error):
                total += sum(child.cpu_times()[:2])
    if s3_server is not None:
        t = s3_server.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


class Readers:
    """The three readers, each started once and kept across epochs: the loader's workers
    persist (``Stream.set_epoch``), the ImageFolder DataLoader has ``persistent_workers``, the
    decode bound keeps its pool; so no epoch pays for starting processes."""

    def __init__(self, uri: str, root: Path, workers: int, batch: int) -> None:
        self.stream = loader.Stream(uri, batch_size=batch, num_workers=workers,
                                    transform=make_transform(), shuffle_seed=0)
        self.imagefolder = torch.utils.data.DataLoader(
            datasets.ImageFolder(str(root), transform=make_transform()), batch_size=batch,
            shuffle=True, num_workers=workers, persistent_workers=True,
        )
        self.pool = mp.get_context("fork").Pool(workers)
        cuts = np.linspace(0, len(_BYTES), workers + 1).astype(int)
        self.shares = list(zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True))

    def loader(self, epoch: int) -> int:
        self.stream.set_epoch(epoch)
        return sum(len(labels) for _, labels, _ in self.stream)

    def imagefolder_(self, epoch: int) -> int:
        return sum(len(labels) for _, labels in self.imagefolder)

    def decode_bound(self, epoch: int) -> int:
        return sum(self.pool.map(_decode_share, self.shares))

    def close(self) -> None:
        self.stream.close()
        self.pool.close()
        self.pool.join()


def _decode_share(bounds: tuple[int, int]) -> int:
    torch.set_num_threads(1)
    assert _TRANSFORM is not None
    for data in _BYTES[bounds[0] : bounds[1]]:
        img = Image.open(io.BytesIO(data))
        img.load()
        # No copy for images that are RGB already (the loader makes none either).
        _TRANSFORM(img if img.mode == "RGB" else img.convert("RGB"))
    return bounds[1] - bounds[0]


def measure(
    fn: Callable[[], int], services_pids: set[int], s3_server: psutil.Process | None
) -> tuple[float, float]:
    """(images/s, CPU ms per image) of one epoch."""
    cpu0, t0 = cpu_seconds(services_pids, s3_server), time.perf_counter()
    n = fn()
    seconds = time.perf_counter() - t0
    cpu = cpu_seconds(services_pids, s3_server) - cpu0
    return n / seconds, cpu / n * 1e3


def main() -> None:
    global _BYTES, _TRANSFORM
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="400 images, 3 repeats")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeats = min(args.images, 400), min(args.repeats, 3)
    # ≥ 8 shards per worker (the rule), and shards of 100 at most.
    shard_size = max(1, min(100, args.images // (8 * args.workers)))

    tmp = Path(tempfile.mkdtemp(prefix="upstream-bench-loader-"))
    home = tmp / "home"
    os.environ["UPSTREAM_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    info = None
    changes: dict[str, str | None] = {}
    try:
        t = time.perf_counter()
        write_source(tmp / "source", args.images)
        seconds = time.perf_counter() - t
        print(f"made {args.images} synthetic {SIDE}x{SIDE} JPEGs in {seconds:.1f} s")
        info = services.up(home)
        changes = services.apply_env(info, override=True)
        storage._client.cache_clear()
        uri = f"{services.DATA_ROOT}/bench-loader/train"
        t = time.perf_counter()
        manifest = shard(ShardConfig.parse(
            source=f"imagefolder:{tmp / 'source'}", output=uri, image_size=SIDE,
            image_format="jpg", shard_size=shard_size, experiment="bench-loader",
        ))
        print(f"sharded into {len(manifest['shards'])} shards on {uri} "
              f"in {time.perf_counter() - t:.1f} s")
        _BYTES = extract_imagefolder(uri, tmp / "imagefolder")
        _TRANSFORM = make_transform()
        mean_kb = sum(map(len, _BYTES)) / len(_BYTES) / 1024
        print(f"{len(_BYTES)} images, {mean_kb:.1f} KB each on average; workers {args.workers}, "
              f"batch {args.batch_size}, transform RandomResizedCrop(224) + ToTensor")
        s3_server = psutil.Process(info.s3_pid)
        services_pids = {info.s3_pid, info.mlflow_pid}

        readers = Readers(uri, tmp / "imagefolder", args.workers, args.batch_size)
        runners: dict[str, Callable[[int], int]] = {
            "loader": readers.loader,
            "imagefolder": readers.imagefolder_,
            "decode_bound": readers.decode_bound,
        }
        names = list(runners)
        for name in names:  # warm-up: starting processes, page cache, S3 server; not counted
            runners[name](0)
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for r in range(1, args.repeats + 1):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                server = s3_server if name == "loader" else None
                results[name].append(
                    measure(functools.partial(runners[name], r), services_pids, server)
                )
            print(f"round {r}: " + ", ".join(
                f"{n} {results[n][-1][0]:.0f} img/s" for n in names), flush=True)
        readers.close()

        print(f"\n{'reader':<14}{'best img/s':>12}{'median img/s':>14}{'CPU ms/img':>12}")
        for name in names:
            speeds = [speed for speed, _ in results[name]]
            cpu = statistics.median(c for _, c in results[name])
            print(f"{name:<14}{max(speeds):>12.0f}{statistics.median(speeds):>14.0f}{cpu:>12.2f}")

        def paired(a: str, b: str) -> float:
            rounds = zip(results[a], results[b], strict=True)
            return statistics.median(x / y for (x, _), (y, _) in rounds)

        print()
        print(f"ratio loader_vs_imagefolder {paired('loader', 'imagefolder'):.2f}")
        print(f"ratio loader_vs_decode_bound {paired('loader', 'decode_bound'):.2f}")
    finally:
        if info is not None:
            services.restore_env(changes)
            services.down(home)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
