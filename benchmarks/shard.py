"""Images/s of the shard stage against a naive loop and against the bound of encoding alone.

    .venv/bin/python benchmarks/shard.py [--quick] [--images N] [--workers W]

Makes an ImageFolder of structured 256×256 JPEGs in a temporary folder, then times, on the
same images with the same work per image (decode, resize to a 128 px square, JPEG encode):

- ``stage``: ``upstream.shards.stage.shard`` writing them to a local folder with its default
  workers, the whole call timed: planning, encoding, tars, the copy into the output, the
  manifest, sizes and the MLflow run (tracking to a SQLite file in the temporary folder,
  created by a warm-up call first: creating a tracking database is once per store, not per
  call);
- ``naive``: one process reading, resizing and encoding each image and writing the same
  shards with ``webdataset.TarWriter``;
- ``encode_bound``: only decode + resize + encode of the same images in a process pool of the
  same size (no tar, no copy, no MLflow): what the stage could reach with nothing else to do.

The page cache is warmed first, and each measurement is the best of ``--repeat`` runs (other
work on the machine only ever slows a run down). Prints the figures, then
``ratio shard_vs_naive X.XX`` and ``ratio shard_vs_encode_bound X.XX``.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SOURCE_SIDE = 256
SIZE = 128
QUALITY = 90
CLASSES = 10
SHARD_SIZE = 250


def make_images(root: Path, count: int, seed: int = 0) -> list[tuple[Path, int]]:
    """``count`` JPEGs in ``CLASSES`` class folders: gradients, shapes and noise, so that
    they compress like photographs rather than flat colour."""
    rng = np.random.default_rng(seed)
    side = SOURCE_SIDE
    axis = np.arange(side, dtype=np.float32) / side
    # One noise field, a different window of it per image: drawing noise per image costs more
    # than everything else here.
    noise = rng.normal(0, 15, (2 * side, 2 * side, 3)).astype(np.float32)
    files = []
    for n in range(count):
        label = n % CLASSES
        a, b, c = rng.uniform(0.5, 4.0, 3)
        ox, oy = rng.integers(0, side, 2)
        base = np.empty((side, side, 3), dtype=np.float32)
        base[..., 0] = (np.sin(a * np.pi * axis + label) * 127.5 + 127.5)[None, :]
        base[..., 1] = (np.cos(b * np.pi * axis - label) * 127.5 + 127.5)[:, None]
        base[..., 2] = ((axis[None, :] * c + axis[:, None]) % 1.0) * 255
        base += noise[oy : oy + side, ox : ox + side]
        img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for k in range(4):
            x0, y0 = rng.integers(0, side - 40, 2)
            w, h = rng.integers(20, 120, 2)
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
            if (label + k) % 2:
                draw.ellipse(box, fill=colour)
            else:
                draw.rectangle(box, fill=colour)
        folder = root / f"class{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{n:06d}.jpg"
        img.save(path, quality=QUALITY)
        files.append((path, label))
    return files


def process_file(path: str) -> bytes:
    """The per-image work every contender does: decode, square resize, JPEG encode."""
    from upstream.data import fit

    with Image.open(path) as img:
        rgb = img.convert("RGB")
    out = io.BytesIO()
    fit(rgb, SIZE).save(out, format="JPEG", quality=QUALITY)
    return out.getvalue()


def _encoded_size(path: str) -> int:
    return len(process_file(path))


def naive(files: list[tuple[Path, int]], output: Path) -> float:
    import webdataset as wds

    began = time.perf_counter()
    output.mkdir(parents=True)
    classes = sorted({p.parent.name for p, _ in files})
    listed = sorted(
        (Path(d, f), classes.index(Path(d).name))
        for d, _, names in os.walk(files[0][0].parent.parent)
        for f in names
        if f.endswith(".jpg")
    )
    order = np.random.default_rng(0).permutation(len(listed))
    writer = stream = None
    for position, k in enumerate(order):
        if position % SHARD_SIZE == 0:
            if writer is not None:
                writer.close()
                stream.close()
            stream = open(output / f"shard-{position // SHARD_SIZE:06d}.tar", "wb")  # noqa: SIM115
            writer = wds.TarWriter(stream, encoder=False, mtime=0)
        path, label = listed[k]
        meta = {"source": "imagefolder", "index": int(k), "file": path.name}
        writer.write(
            {
                "__key__": f"{position:06d}",
                "jpg": process_file(str(path)),
                "cls": str(label).encode(),
                "txt": f"a photo of a {classes[label]}.".encode(),
                "json": json.dumps(meta, sort_keys=True).encode(),
            }
        )
    assert writer is not None and stream is not None
    writer.close()
    stream.close()
    return time.perf_counter() - began


def encode_bound(files: list[tuple[Path, int]], workers: int) -> float:
    from upstream.shards.workerpool import chunk_size

    paths = [str(p) for p, _ in files]
    began = time.perf_counter()
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers) as pool:
        total = sum(pool.imap(_encoded_size, paths, chunksize=chunk_size(len(paths), workers)))
    assert total > 0
    return time.perf_counter() - began


def stage(folder: Path, output: Path) -> float:
    from upstream.shards.stage import ShardConfig, shard

    config = ShardConfig.parse(
        source=f"imagefolder:{folder}",
        output=str(output),
        image_size=SIZE,
        resize="square",
        image_format="jpg",
        jpeg_quality=QUALITY,
        shard_size=SHARD_SIZE,
        experiment="benchmark",
    )
    began = time.perf_counter()
    manifest = shard(config)
    seconds = time.perf_counter() - began
    assert manifest["num_samples"] == len(list(folder.rglob("*.jpg")))
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer images, one run each")
    parser.add_argument("--images", type=int, default=0, help="images (default 6000; quick 1500)")
    parser.add_argument("--repeat", type=int, default=0, help="runs of each (default 5; quick 1)")
    args = parser.parse_args()
    count = args.images or (1500 if args.quick else 6000)
    repeat = args.repeat or (1 if args.quick else 5)
    workers = os.cpu_count() or 1
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="upstream-bench-") as tmp_text:
        tmp = Path(tmp_text)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        os.environ["UPSTREAM_HOME"] = str(tmp / "home")
        began = time.perf_counter()
        files = make_images(tmp / "images", count)
        made = time.perf_counter() - began
        print(f"made {count} {SOURCE_SIDE}x{SOURCE_SIDE} JPEGs in {made:.1f} s")
        for path, _ in files:  # page cache warm for everyone
            path.read_bytes()
        warm = make_images(tmp / "warm", 20, seed=1)
        stage(warm[0][0].parent.parent, tmp / "warm-out")

        times: dict[str, list[float]] = {"stage": [], "naive": [], "encode_bound": []}
        for r in range(repeat):
            times["naive"].append(naive(files, tmp / f"naive-{r}"))
            times["encode_bound"].append(encode_bound(files, workers))
            times["stage"].append(stage(tmp / "images", tmp / f"stage-{r}"))
        best = {name: count / min(ts) for name, ts in times.items()}
        print(f"images: {count}, {SOURCE_SIDE} px JPEG -> {SIZE} px square JPEG q{QUALITY}; "
              f"workers: {workers}; best of {repeat}")
        for name, rate in best.items():
            runs = ", ".join(f"{count / t:.0f}" for t in times[name])
            print(f"{name:>13}: {rate:8.1f} images/s   (runs: {runs})")
        print(f"ratio shard_vs_naive {best['stage'] / best['naive']:.2f}")
        print(f"ratio shard_vs_encode_bound {best['stage'] / best['encode_bound']:.2f}")


if __name__ == "__main__":
    main()
