"""Bounded decoding: an image whose header promises more pixels than the manifest (or the
ceiling) allows is refused before it is decoded, in one line naming the shard and the key.

The drills run the real ``upstream evaluate`` and the real loader as child processes and
measure their peak memory (a 400 KB PNG of 20000×20000 pixels once took ``evaluate`` to
6.9 GB); a guard kills a child that passes 2 GB, so that a regression cannot take the
machine down with it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
from PIL import Image

from upstream import imagebounds
from upstream.errors import UpstreamError
from upstream.shards import loader
from upstream.shards.stage import ShardConfig, shard

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")

SIDE = 20000
#: Peak memory a refused child may reach. ``evaluate`` peaks at ~1.1 GB with a clean set
#: (torch, torchvision, MLflow, the model); decoding the bomb adds 1.2 GB for its RGB bytes
#: alone, 4.8 GB more as floats.
MAX_RSS_EVALUATE = 3 << 29
#: What a loader child refusing the bomb may use beyond the same child reading the clean set.
#: Its own peak varies with the machine (0.7–1.1 GB measured: torch's libraries are mapped
#: pages, counted as they are touched); the bomb decoded would add at least its 400 MB of grey
#: pixels.
MAX_EXTRA_RSS = 256 << 20
#: A child beyond this is killed: the regression is then a failure, not a swapping machine.
KILL_RSS = 3 << 30
SRC = Path(__file__).resolve().parents[1] / "src"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body)))


@pytest.fixture(scope="module")
def png_bomb() -> bytes:
    """A valid, all-black 8-bit grey PNG of SIDE × SIDE pixels: ~390 KB, 1.2 GB as RGB."""
    z = zlib.compressobj(9)
    row = bytes(SIDE + 1)  # the filter byte, then the row
    idat = b"".join(z.compress(row) for _ in range(SIDE)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", SIDE, SIDE, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def _forged_jpeg(side: int = SIDE) -> bytes:
    """A real 16×16 JPEG whose frame header claims ``side`` × ``side`` pixels: decoders that
    trust it allocate the whole frame before they find the data short."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", side, side)  # height, width
    return bytes(data)


def _swap_image(folder: Path, key: str, data: bytes, ext: str = "png") -> str:
    """Put ``data`` as sample ``key``'s image and update the manifest's sizes and hashes, as
    someone who can write the store would; return the shard's path."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
        names = [name for name, _ in members]
        if not any(n.startswith(f"{key}.") for n in names):
            continue
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for name, body in members:
                stem, _, member_ext = name.partition(".")
                if stem == key and member_ext in loader.IMAGE_KEYS:
                    name, body = f"{key}.{ext}", data
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        path.write_bytes(out.getvalue())
        entry["size"] = len(out.getvalue())
        entry["sha256"] = hashlib.sha256(out.getvalue()).hexdigest()
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return str(path)
    raise AssertionError(f"no sample {key} in {folder}")


#: Runs argv[2:] in a child of its own and writes that child's peak RSS (KiB) to argv[1].
#: A process started from pytest itself would report pytest's peak: Linux carries the
#: high-water mark of the memory a process replaces at exec, and subprocess starts children
#: with vfork, in pytest's memory. A fork of this small interpreter carries its own instead.
LAUNCH = """import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def _run(args: list[str], scratch: Path, timeout: float = 120.0) -> tuple[int, str, float, int]:
    """Run a command; its exit code, stderr, seconds and peak RSS (bytes, from wait4)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    killed: list[str] = []
    err_path, rss_path = scratch / "stderr.txt", scratch / "maxrss.txt"
    with open(os.devnull, "wb") as devnull, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCH, str(rss_path), *args],
                                stdout=devnull, stderr=err, env=env)

        def guard() -> None:
            try:
                launcher = psutil.Process(proc.pid)
                while proc.poll() is None:
                    family = [launcher, *launcher.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in family)
                    if rss > KILL_RSS or time.monotonic() - t0 > timeout:
                        killed.append(f"rss {rss >> 20} MB after {time.monotonic() - t0:.0f} s")
                        for p in reversed(family):
                            p.kill()
                        return
                    time.sleep(0.05)
            except psutil.Error:  # it ended
                return

        watcher = threading.Thread(target=guard, daemon=True)
        watcher.start()
        proc.wait()
        seconds = time.monotonic() - t0
        watcher.join()
    stderr = err_path.read_text(errors="replace")
    assert not killed, f"child killed ({killed[0]}); stderr tail: {stderr[-2000:]}"
    return proc.returncode, stderr, seconds, int(rss_path.read_text()) * 1024


def _error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines, "no output"
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[-1]


def test_evaluate_refuses_a_png_bomb_before_decoding(
    finetuned_digits: dict[str, Any], digits_test: str, png_bomb: bytes, tmp_path: Path,
) -> None:
    data = tmp_path / "digits-test"
    shutil.copytree(digits_test, data)
    shard_path = _swap_image(data, "000005", png_bomb)
    rc, stderr, seconds, rss = _run([
        sys.executable, "-m", "upstream", "evaluate", "--model", finetuned_digits["model"],
        "--id-data", str(data), "--experiment", "bounded-decoding"], tmp_path)
    line = _error_line(stderr)
    assert rc == 2, stderr[-3000:]
    assert line == (f"error: cannot decode image 000005 in {shard_path}: it is {SIDE}×{SIDE} "
                    "pixels, more than the manifest's image_size (resize=square) allows (32 on a "
                    "side)")
    assert rss < MAX_RSS_EVALUATE, f"peak RSS {rss >> 20} MB"
    assert seconds < 60


@pytest.fixture(scope="module")
def keep_set(tmp_path_factory: pytest.TempPathFactory, training_env: Path) -> Path:
    """Eight digits stored as they are (resize=keep): only the ceiling bounds them."""
    out = tmp_path_factory.mktemp("keep") / "digits-keep"
    shard(ShardConfig.parse(source="digits", num_classes=2, samples_per_class=4,
                            resize="keep", shard_size=4, output=str(out)))
    return out


READ_STREAM = """
import sys
from upstream.errors import UpstreamError
from upstream.shards import loader
try:
    for _ in loader.Stream(sys.argv[1], batch_size=2, shuffle_seed=None, num_workers={workers},
                           transform={transform}):
        pass
except UpstreamError as e:
    sys.exit(f"error: {{e}}")
"""


@pytest.mark.parametrize(("fmt", "workers", "transform"), [
    ("png", 0, "None"),  # torchvision's decoder, in the training process
    ("jpg", 1, "lambda img: __import__('torch').zeros(3, 4, 4)"),  # PIL, in a worker
])
def test_stream_refuses_an_image_over_the_ceiling_of_a_keep_set(
    keep_set: Path, png_bomb: bytes, tmp_path: Path, fmt: str, workers: int, transform: str,
) -> None:
    data = tmp_path / "keep"
    shutil.copytree(keep_set, data)
    script = READ_STREAM.format(workers=workers, transform=transform)
    rc, stderr, _, clean_rss = _run([sys.executable, "-c", script, str(data)], tmp_path)
    assert rc == 0, stderr[-3000:]
    image = png_bomb if fmt == "png" else _forged_jpeg()
    shard_path = _swap_image(data, "000002", image, fmt)
    rc, stderr, seconds, rss = _run([sys.executable, "-c", script, str(data)], tmp_path)
    line = _error_line(stderr)
    assert rc == 1 and line.startswith(f"error: cannot decode image 000002 in {shard_path}: it "
                                       "is "), stderr[-3000:]
    # PIL's own guard met the forged JPEG first: its pixel count, in the same one line.
    assert f"{SIDE}×{SIDE} pixels" in line or f"{SIDE * SIDE} pixels" in line
    assert "imagebounds.MAX_PIXELS" in line
    assert rss < clean_rss + MAX_EXTRA_RSS, f"peak RSS {rss >> 20} MB ({clean_rss >> 20} clean)"
    assert seconds < 60


def test_shard_stage_skips_or_fails_on_a_source_image_over_the_ceiling(
    tmp_path: Path,
) -> None:
    """Between the ceiling and PIL's own limit (PIL alone would decode it), a source image is
    refused by the shard stage's policy for unreadable images, so that the readers of the
    ``keep`` set it writes never meet one."""
    side = 8200  # 67.2 M pixels: over 8192², under PIL's 89.5 M
    assert imagebounds.MAX_PIXELS < side * side < Image.MAX_IMAGE_PIXELS
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(bytes(side + 1)) for _ in range(side)) + z.flush()
    big = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0,
                                                                 0, 0))
           + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    root = tmp_path / "folder"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (10 + i, 12), (40 * i, 90, 200)).save(root / c / f"{i}.png")
    (root / "a" / "big.png").write_bytes(big)
    common = dict(source=f"imagefolder:{root}", resize="keep", workers=1)
    manifest = shard(ShardConfig.parse(output=str(tmp_path / "skip"), **common))
    assert manifest["num_samples"] == 4 and manifest["skipped"]["count"] == 1
    assert f"{side}×{side} pixels" in manifest["skipped"]["images"][0]["reason"]
    with pytest.raises(UpstreamError, match=rf"big\.png.*{side}×{side} pixels") as e:
        shard(ShardConfig.parse(output=str(tmp_path / "fail"), on_bad_image="fail", **common))
    assert "\n" not in str(e.value)


def test_bounds_come_from_the_manifest() -> None:
    square = imagebounds.for_manifest({"resize": "square", "image_size": 32})
    square.check(32, 32)
    with pytest.raises(imagebounds.TooLarge, match="33×32 pixels"):
        square.check(33, 32)
    assert imagebounds.for_manifest({"resize": "keep", "image_size": 32}) == imagebounds.CEILING
    assert imagebounds.for_manifest({}) == imagebounds.CEILING
    imagebounds.CEILING.check(8192, 8192)
    with pytest.raises(imagebounds.TooLarge, match="MAX_PIXELS"):
        imagebounds.CEILING.check(8193, 8192)
