"""Writing shards: layout (count, bytes, min_shards), resize modes, byte copies, workers,
captions, unreadable images, k-shot lists, sizes.json, resume after a kill, S3 uploads."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import upstream.shards.stage as shard_module
from upstream import storage
from upstream.data import Source
from upstream.data.base import BadImage, seed_words
from upstream.errors import UpstreamError
from upstream.shards import tars
from upstream.shards.captioning import clip_templates
from upstream.shards.loader import kshot_indices, load_split
from upstream.shards.stage import ShardConfig, per_shard, shard

pytestmark = pytest.mark.usefixtures("tracking_home")


# --- helpers --------------------------------------------------------------------------------


class MemorySource(Source):
    """Images held in memory (PIL images or encoded files), with the optional parts of the
    Source API switched on per test: own captions, raw files, unreadable indices."""

    kind = "memory"

    def __init__(
        self,
        images: list[Image.Image | bytes],
        labels: list[int],
        class_names: list[str],
        *,
        captions: list[str | None] | None = None,
        raw_ext: str | None = None,
        bad: set[int] | None = None,
    ) -> None:
        super().__init__(class_names, labels, "train")
        self.images = images
        self.captions = captions
        self.raw_ext = raw_ext
        self.bad = bad or set()

    def image(self, index: int) -> Image.Image:
        if index in self.bad:
            raise BadImage(f"image {index} is broken")
        item = self.images[index]
        if isinstance(item, bytes):
            return Image.open(io.BytesIO(item))  # decoded lazily: bad data fails on load()
        return item

    def raw(self, index: int) -> tuple[bytes, str] | None:
        item = self.images[index]
        if self.raw_ext is None or not isinstance(item, bytes):
            return None
        if index in self.bad:
            raise BadImage(f"file {index} is gone")
        return item, self.raw_ext

    def caption(self, index: int) -> str | None:
        return self.captions[index] if self.captions is not None else None

    def meta(self, index: int) -> dict[str, Any]:
        return {"name": f"img{index}"}


def picture(index: int, size: tuple[int, int] = (24, 24)) -> Image.Image:
    rng = np.random.default_rng(index)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def memory_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: Source, output: Path, **kw: Any
) -> ShardConfig:
    """A config whose imagefolder source is ``source`` (the stage opens it by its path)."""
    folder = tmp_path / "memory"
    folder.mkdir(exist_ok=True)
    real = shard_module.open_source

    def open_source(spec: Any, split: str, **kwargs: Any) -> Source:
        return source if spec.arg == str(folder) else real(spec, split, **kwargs)

    monkeypatch.setattr(shard_module, "open_source", open_source)
    values: dict[str, Any] = {"source": f"imagefolder:{folder}", "shard_size": 4, "workers": 1}
    values.update(kw)
    return ShardConfig.parse(output=str(output), **values)


def digits(output: Path | str, **kw: Any) -> ShardConfig:
    values: dict[str, Any] = dict(
        source="digits", num_classes=3, samples_per_class=10, image_size=16, shard_size=8
    )
    values.update(kw)
    return ShardConfig.parse(output=str(output), **values)


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def samples(folder: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of a shard set by key, in key order."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        for name, data in members(path).items():
            key, _, ext = name.partition(".")
            out.setdefault(key, {})[ext] = data
    return dict(sorted(out.items()))


def set_files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def comparable(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest without where it was written."""
    out = {k: v for k, v in manifest.items() if k != "uri"}
    out["config"] = {k: v for k, v in manifest["config"].items() if k != "output"}
    return out


def order_of(n: int, seed: int = 0) -> np.ndarray:
    """The stage's written order of ``n`` planned items (position → item)."""
    return np.random.default_rng(seed_words("shard-order", seed)).permutation(n)


# --- layout ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "shard_size", "min_shards", "expected"),
    [(30, 8, 1, 8), (30, 8, 4, 8), (30, 8, 5, 6), (30, 8, 7, 4), (9, 100, 4, 2), (5, 8, 40, 1)],
)
def test_per_shard(n: int, shard_size: int, min_shards: int, expected: int) -> None:
    assert per_shard(n, shard_size, min_shards) == expected


def test_min_shards_lowers_the_count(tmp_path: Path) -> None:
    m = shard(digits(tmp_path / "out", min_shards=7))
    assert [s["num_samples"] for s in m["shards"]] == [4] * 7 + [2]
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {
        f"shard-{i:06d}.tar": c for i, c in enumerate([4] * 7 + [2])
    }


def test_shard_bytes_cut(tmp_path: Path) -> None:
    out = tmp_path / "out"
    limit = 3 * tars.RECORD  # a few samples of 16 px PNG each
    m = shard(digits(out, shard_size=1000, shard_bytes=limit))
    sizes = [s["size"] for s in m["shards"]]
    counts = [s["num_samples"] for s in m["shards"]]
    assert sum(counts) == 30 and len(counts) > 1
    assert all(size <= limit for size in sizes)
    assert sizes == [(out / s["name"]).stat().st_size for s in m["shards"]]
    # Each shard is cut exactly where the next sample would not fit any more.
    shards = sorted(out.glob("shard-*.tar"))
    def taken(data: list[bytes]) -> int:  # a header block each, data padded to blocks
        return sum(tars.BLOCK + -(-len(v) // tars.BLOCK) * tars.BLOCK for v in data)

    for this, following in zip(shards, shards[1:], strict=False):
        inside = taken(list(members(this).values()))
        first_key = sorted(members(following))[0].partition(".")[0]
        extra = taken([v for k, v in members(following).items() if k.startswith(first_key)])
        assert this.stat().st_size == tars.file_size(inside)
        assert tars.file_size(inside + extra) > limit
    # A limit below one sample: one sample per shard.
    one = shard(digits(tmp_path / "one", shard_size=1000, shard_bytes=1))
    assert [s["num_samples"] for s in one["shards"]] == [1] * 30


def test_tar_writer_matches_webdataset() -> None:
    import webdataset as wds

    rng = np.random.default_rng(0)
    batch: list[dict[str, Any]] = []
    for k, n in enumerate([0, 1, 511, 512, 513, 1024, 5000]):
        batch.append({"__key__": f"{k:06d}", "jpg": rng.bytes(n), "cls": b"3", "txt": b"a"})
    batch.append({"__key__": "x" * 120, "png": b"long name: a pax header"})
    batch.append({"__key__": "\u00e9t\u00e9", "json": b"{}", "_meta": b"left out"})
    theirs, ours = io.BytesIO(), io.BytesIO()
    writer = wds.TarWriter(theirs, encoder=False, mtime=0)
    for sample in batch:
        writer.write(sample)
    writer.close()
    with tars.TarWriter(ours) as mine:
        for sample in batch:
            mine.write(sample)
    assert ours.getvalue() == theirs.getvalue()
    assert len(ours.getvalue()) % tars.RECORD == 0


def test_sample_templates_patch_to_the_same_bytes() -> None:
    """Workers make a sample's members under a placeholder key; the writer patches the key
    in: the same bytes as encoding the sample under that key (headers, checksums, padding)."""
    rng = np.random.default_rng(1)
    for n in [0, 1, 511, 512, 513, 5000]:
        members = {"jpg": rng.bytes(n), "cls": b"7", "txt": b"a photo", "json": b"{}"}
        template = tars.sample_template(6, members)
        assert template is not None and len(template.headers) == 4
        for key in ["000000", "000009", "123456", "999999"]:
            assert tars.with_key(template, key) == tars.encode_sample({"__key__": key, **members})
    with pytest.raises(ValueError, match="is not 6 digits"):
        tars.with_key(template, "1234567")
    assert tars.sample_template(6, {"\u00e9": b"x"}) is None  # not plain ustar: the writer's job


def test_workers_do_not_change_a_byte(tmp_path: Path) -> None:
    kw = dict(corruption="mixed", image_format="jpg", jpeg_quality=70, shard_size=7, kshot="2")
    one = shard(digits(tmp_path / "one", workers=1, **kw))
    two = shard(digits(tmp_path / "two", workers=2, **kw))
    assert set_files(tmp_path / "one") == set_files(tmp_path / "two")
    assert comparable(one) == comparable(two)
    assert "workers" not in one["config"]
    assert one["keys"] == ["cls", "jpg", "json", "txt"]
    assert [s["num_samples"] for s in one["shards"]] == [7, 7, 7, 7, 2]


def test_keys_are_positions_and_the_manifest_comes_last(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = shard(digits(out, shard_size=7, kshot="1"))
    assert list(samples(out)) == [f"{i:06d}" for i in range(30)]
    manifest_time = (out / "manifest.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= manifest_time for p in out.rglob("*") if p.is_file())
    assert not (out / ".progress.json").exists()
    assert m["sizes"] == "sizes.json" and m["kshot"] == [f"kshot/k1-seed{s}.json" for s in range(3)]
    assert m["labelled"] is True and m["resize"] == "square" and m["image_size"] == 16
    assert m["skipped"] == {"count": 0, "images": []}
    assert m["interventions"]["num_samples"] == 30


def test_stage_files_of_another_attempt_are_cleared(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "kshot").mkdir(parents=True)
    leftovers = ["kshot/k1-seed0.json", "kshot/.k1-seed0.json.a1b2", "sizes.json",
                 ".sizes.json.c3d4", ".progress.json", "..progress.json.e5f6"]
    for name in leftovers:
        (out / name).write_text("{}")
    shard(digits(out))
    left = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert left == ["manifest.json", *(f"shard-00000{i}.tar" for i in range(4)), "sizes.json"]


def test_unlabelled_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    captions: list[str | None] = [f"a caption {i}" for i in range(5)]
    source = MemorySource([picture(i) for i in range(5)], [0] * 5, ["unlabeled"],
                          captions=captions)
    source.has_labels = False
    out = tmp_path / "out"
    m = shard(memory_config(tmp_path, monkeypatch, source, out, captions="own"))
    assert m["labelled"] is False and m["num_classes"] == 1 and m["num_samples"] == 5
    assert {s["cls"] for s in samples(out).values()} == {b"0"}
    assert {s["txt"].decode() for s in samples(out).values()} == set(captions)
    with pytest.raises(UpstreamError, match="kshot needs labels"):
        shard(memory_config(tmp_path, monkeypatch, source, tmp_path / "k", kshot="1"))


# --- images ---------------------------------------------------------------------------------


def test_resize_modes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = [(40, 20), (10, 30), (8, 4), (16, 16)]
    source = MemorySource([picture(i, s) for i, s in enumerate(shapes)], [0, 0, 1, 1], ["a", "b"])
    expected = {
        "square": [(16, 16)] * 4,
        "max_side": [(16, 8), (5, 16), (8, 4), (16, 16)],
        "keep": shapes,
    }
    for mode, sizes in expected.items():
        out = tmp_path / mode
        m = shard(memory_config(tmp_path, monkeypatch, source, out, resize=mode, image_size=16))
        got = {}
        for sample in samples(out).values():
            index = json.loads(sample["json"])["index"]
            got[index] = Image.open(io.BytesIO(sample["png"])).size
        assert [got[i] for i in range(4)] == sizes, mode
        assert m["resize"] == mode


def test_keep_copies_files_byte_for_byte(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [jpeg(picture(i, (30 + i, 20))) for i in range(6)]
    source = MemorySource(list(files), [0, 1] * 3, ["a", "b"], raw_ext="jpeg")
    out = tmp_path / "keep"
    m = shard(memory_config(tmp_path, monkeypatch, source, out, resize="keep"))
    assert m["keys"] == ["cls", "jpg", "json", "txt"]
    for sample in samples(out).values():
        assert sample["jpg"] == files[json.loads(sample["json"])["index"]]
    # Anything that changes the pixels re-encodes them.
    for kw in ({"resize": "keep", "corruption": "noise"}, {"resize": "square"}):
        out = tmp_path / "-".join(map(str, kw.values()))
        shard(memory_config(tmp_path, monkeypatch, source, out, image_format="jpg", **kw))
        for sample in samples(out).values():
            assert sample["jpg"] != files[json.loads(sample["json"])["index"]]


def test_imagefolder_files_are_copied_and_others_encoded(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    data = {}
    for i in range(4):
        cls = folder / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        path = cls / f"{i}.jpg"
        path.write_bytes(jpeg(picture(i)))
        data[f"{cls.name}/{i}.jpg"] = path.read_bytes()
    picture(9).save(folder / "cat" / "9.bmp")
    out = tmp_path / "out"
    m = shard(ShardConfig.parse(source=f"imagefolder:{folder}", output=str(out), resize="keep"))
    assert m["num_samples"] == 5 and m["keys"] == ["cls", "jpg", "json", "png", "txt"]
    for sample in samples(out).values():
        name = json.loads(sample["json"])["file"]
        if name.endswith(".bmp"):
            assert Image.open(io.BytesIO(sample["png"])).size == (24, 24)
        else:
            assert sample["jpg"] == data[name]


# --- unreadable images ----------------------------------------------------------------------


def bad_source() -> MemorySource:
    images: list[Image.Image | bytes] = [jpeg(picture(i)) for i in range(10)]
    images[5] = jpeg(picture(5))[:200]  # truncated: PIL fails decoding it
    return MemorySource(images, [i % 2 for i in range(10)], ["even", "odd"], bad={2})


def test_unreadable_images_are_skipped_and_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    for raw_ext in (None, "jpg"):  # decoded, and copied (still checked)
        source = bad_source()
        source.raw_ext = raw_ext
        kw = {"resize": "keep"} if raw_ext else {}
        m = shard(memory_config(tmp_path, monkeypatch, source, out, workers=2, **kw))
        assert m["num_samples"] == 8 and m["class_counts"] == {"even": 4, "odd": 4}
        assert m["skipped"]["count"] == 2
        listed = {item["index"]: item for item in m["skipped"]["images"]}
        assert sorted(listed) == [2, 5]
        assert listed[2]["source"] == f"imagefolder:{tmp_path / 'memory'}"
        assert "broken" in listed[2]["reason"] or "gone" in listed[2]["reason"]
        assert "Error" in listed[5]["reason"]  # PIL's, naming what it found wrong
        assert list(samples(out)) == [f"{i:06d}" for i in range(8)]
        assert sum(s["num_samples"] for s in m["shards"]) == 8


def test_unreadable_image_fails_by_policy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    config = memory_config(tmp_path, monkeypatch, bad_source(), out, on_bad_image="fail")
    first_bad = min(p for p, i in enumerate(order_of(10)) if i in (2, 5))
    index = int(order_of(10)[first_bad])
    with pytest.raises(UpstreamError, match=rf"cannot read image {index} of imagefolder:") as e:
        shard(config)
    assert "\n" not in str(e.value)
    assert not (out / "manifest.json").exists()


def test_corrupt_file_in_an_imagefolder(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    for i in range(6):
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (folder / f"c{i % 2}" / f"{i}.jpg").write_bytes(jpeg(picture(i)))
    (folder / "c0" / "2.jpg").write_bytes(b"not a jpeg at all")
    m = shard(ShardConfig.parse(source=f"imagefolder:{folder}", output=str(tmp_path / "out")))
    assert m["num_samples"] == 5 and m["skipped"]["count"] == 1
    assert m["class_counts"] == {"c0": 2, "c1": 3}
    with pytest.raises(UpstreamError, match=r"c0/2\.jpg"):
        shard(
            ShardConfig.parse(
                source=f"imagefolder:{folder}", output=str(tmp_path / "f"), on_bad_image="fail"
            )
        )


def test_dedup_hashes_in_the_pool_and_lists_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = [picture(i % 6) for i in range(12)]  # each picture twice
    source = MemorySource(list(images), [i % 2 for i in range(12)], ["a", "b"], bad={7})
    out = tmp_path / "out"
    m = shard(memory_config(tmp_path, monkeypatch, source, out, dedup="exact", workers=2))
    # 0..5 kept, 6..11 duplicates of them; 7 unreadable (so 1 is kept, not dropped for it).
    indices = sorted(json.loads(s["json"])["index"] for s in samples(out).values())
    assert indices == [0, 1, 2, 3, 4, 5]
    assert m["skipped"]["count"] == 1 and m["skipped"]["images"][0]["index"] == 7
    with pytest.raises(UpstreamError, match="cannot read image 7 of .*de-duplicating"):
        shard(memory_config(tmp_path, monkeypatch, source, tmp_path / "f", dedup="exact",
                            on_bad_image="fail"))
    assert not (tmp_path / "f").exists()


# --- captions -------------------------------------------------------------------------------


def test_clip_templates_one_per_image(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = shard(digits(out, caption_template="clip", shard_size=100))
    templates = clip_templates()
    assert len(templates) == 80 and templates[0] == "a bad photo of a {label}."
    captions = []
    for sample in samples(out).values():
        name = json.loads(sample["json"])["class_name"]
        caption = sample["txt"].decode()
        assert caption in {t.replace("{label}", name) for t in templates}
        captions.append(caption)
    assert len(set(captions)) > 10
    assert m["caption_template"] == "clip"
    again = tmp_path / "again"
    shard(digits(again, caption_template="clip", shard_size=100))
    assert set_files(out) == set_files(again)


def test_own_captions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = [f"picture number {i}" if i % 3 else None for i in range(6)]
    source = MemorySource([picture(i) for i in range(6)], [0, 1] * 3, ["a", "b"], captions=own)
    out = tmp_path / "auto"
    shard(memory_config(tmp_path, monkeypatch, source, out, caption_template="{label}!"))
    got = {json.loads(s["json"])["index"]: s["txt"].decode() for s in samples(out).values()}
    assert got == {i: own[i] or f"{'ab'[i % 2]}!" for i in range(6)}
    with pytest.raises(UpstreamError, match="captions=own but imagefolder:.* has no captions of"):
        shard(memory_config(tmp_path, monkeypatch, source, tmp_path / "own", captions="own"))
    source.captions = [f"picture number {i}" if i != 3 else None for i in range(6)]
    with pytest.raises(UpstreamError, match="captions=own but image 3 of imagefolder:.* has no"):
        shard(memory_config(tmp_path, monkeypatch, source, tmp_path / "own", captions="own"))
    assert not (tmp_path / "own").exists()
    with pytest.raises(UpstreamError, match="captions=own but digits has no captions of its own"):
        shard(digits(tmp_path / "digits", captions="own"))
    out = tmp_path / "template"
    shard(memory_config(tmp_path, monkeypatch, source, out, captions="template"))
    assert {s["txt"] for s in samples(out).values()} == {b"a photo of a a.", b"a photo of a b."}


# --- k-shot lists and mixtures --------------------------------------------------------------


def test_kshot_lists(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = shard(digits(out, kshot="1,4", kshot_trials=2))
    names = [f"kshot/k{k}-seed{s}.json" for k in (1, 4) for s in (0, 1)]
    assert m["kshot"] == names
    _, labels, _ = load_split(str(out))
    for name in names:
        stored = json.loads((out / name).read_text())
        k, seed = stored["k"], stored["seed"]
        assert stored["indices"] == kshot_indices(labels, k, seed, class_names=m["class_names"])
        assert Counter(labels[stored["indices"]].tolist()) == {0: k, 1: k, 2: k}
    assert json.loads((out / "kshot/k4-seed0.json").read_text()) != json.loads(
        (out / "kshot/k4-seed1.json").read_text()
    )


def test_kshot_too_large_fails_before_encoding(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(UpstreamError, match=r"kshot=11 but class 'zero' has only 10 images"):
        shard(digits(out, kshot="2,11"))
    assert not out.exists()


def test_mixture(tmp_path: Path) -> None:
    out = tmp_path / "mix"
    m = shard(digits(out, source="digits+shapes", num_classes=2, samples_per_class=4))
    assert m["class_names"] == ["zero", "one", "circle", "square"]
    assert m["class_counts"] == {"zero": 4, "one": 4, "circle": 4, "square": 4}
    metas = [json.loads(s["json"]) for s in samples(out).values()]
    assert Counter(meta["source_no"] for meta in metas) == {0: 8, 1: 8}
    assert {meta["source"] for meta in metas} == {"digits", "shapes"}
    assert m["caption_templates"] == ["a photo of the digit {label}.", "a drawing of a {label}."]


# --- resume ---------------------------------------------------------------------------------


def test_resume_after_kill(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import psutil

    out = tmp_path / "out"
    args = ["--image-size", "128", "--shard-size", "100", "--workers", "2"]
    cmd = [sys.executable, "-m", "upstream", "shard", "--output", str(out), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / ".progress.json"
    children: list[Any] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                children = psutil.Process(proc.pid).children(recursive=True) or children
            if progress.exists() and len(json.loads(progress.read_text())["shards"]) >= 2:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    # The pool's workers die with the stage: nothing is left encoding for nobody.
    assert len(children) == 2
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive
    done = json.loads(progress.read_text())["shards"]
    assert 2 <= len(done) < 15
    before = {e["name"]: (out / e["name"]).stat().st_mtime_ns for e in done}

    config = ShardConfig.parse(output=str(out), image_size=128, shard_size=100)
    with caplog.at_level(logging.INFO, logger="upstream.shards.stage"):
        resumed = shard(config)
    assert f"after {len(done)} finished shard(s)" in caplog.text
    assert {name: (out / name).stat().st_mtime_ns for name in before} == before
    reference = tmp_path / "reference"
    whole = shard(ShardConfig.parse(output=str(reference), image_size=128, shard_size=100,
                                    workers=1))
    assert set_files(out) == set_files(reference)
    assert comparable(resumed) == comparable(whole)
    assert len(whole["shards"]) == 15


def failing_midway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str,
                   **kw: Any) -> tuple[MemorySource, ShardConfig]:
    """A 20-image source whose image at position 17 is unreadable until it is fixed."""
    images: list[Image.Image | bytes] = [picture(i) for i in range(20)]
    source = MemorySource(images, [i % 4 for i in range(20)], list("abcd"),
                          bad={int(order_of(20)[17])})
    config = memory_config(tmp_path, monkeypatch, source, Path("unused"), on_bad_image="fail",
                           kshot="2", **kw)
    return source, ShardConfig.parse(**{**config.model_dump(), "output": output})


def test_resume_after_a_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    source, config = failing_midway(tmp_path, monkeypatch, str(out))
    with pytest.raises(UpstreamError, match="cannot read image"):
        shard(config)
    progress = json.loads((out / ".progress.json").read_text())
    assert [e["name"] for e in progress["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [e["next_position"] for e in progress["shards"]] == [4, 8, 12, 16]
    # A shard that went missing is written again, and everything after it.
    (out / "shard-000002.tar").unlink()
    source.bad = set()
    with caplog.at_level(logging.INFO, logger="upstream.shards.stage"):
        resumed = shard(config)
    assert "after 2 finished shard(s)" in caplog.text
    reference = tmp_path / "reference"
    whole = shard(ShardConfig.parse(**{**config.model_dump(), "output": str(reference)}))
    assert set_files(out) == set_files(reference)
    assert comparable(resumed) == comparable(whole)


def test_other_config_does_not_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    source, config = failing_midway(tmp_path, monkeypatch, str(out))
    with pytest.raises(UpstreamError):
        shard(config)
    assert (out / "shard-000003.tar").exists()
    source.bad = set()
    other = ShardConfig.parse(**{**config.model_dump(), "shard_size": 10})
    with caplog.at_level(logging.INFO, logger="upstream.shards.stage"):
        m = shard(other)
    assert "finished shard" not in caplog.text
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-000000.tar", "shard-000001.tar"]
    assert [s["num_samples"] for s in m["shards"]] == [10, 10]


# --- S3 -------------------------------------------------------------------------------------


def test_s3_set_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, moto_s3: str,
                           caplog: pytest.LogCaptureFixture) -> None:
    out = f"s3://{moto_s3}/sets/memory"
    source, config = failing_midway(tmp_path, monkeypatch, out)
    with pytest.raises(UpstreamError, match="cannot read image"):
        shard(config)
    assert storage.exists(f"{out}/.progress.json")
    source.bad = set()
    with caplog.at_level(logging.INFO, logger="upstream.shards.stage"):
        m = shard(config)
    assert "after 4 finished shard(s)" in caplog.text
    names = sorted(u[len(out) + 1 :] for u in storage.list_files(out))
    assert names == [
        *(f"kshot/k2-seed{s}.json" for s in range(3)),
        "manifest.json",
        *(f"shard-{i:06d}.tar" for i in range(5)),
        "sizes.json",
    ]
    local = tmp_path / "local"
    whole = shard(ShardConfig.parse(**{**config.model_dump(), "output": str(local)}))
    for name, data in set_files(local).items():
        assert storage.read_bytes(f"{out}/{name}") == data, name
    assert comparable(m) == comparable(whole)


def test_multipart_upload(tmp_path: Path, moto_s3: str) -> None:
    path = tmp_path / "big.bin"
    data = np.random.default_rng(0).bytes(11 * 1024**2)
    path.write_bytes(data)
    uri = f"s3://{moto_s3}/big.bin"
    storage.upload_file(path, uri, part_size=5 * 1024**2)
    etag = storage.s3_client().head_object(Bucket=moto_s3, Key="big.bin")["ETag"]
    assert etag.strip('"').endswith("-3")  # three parts
    assert storage.read_bytes(uri) == data
    assert storage.size(uri) == len(data) and storage.size(f"{uri}.missing") is None


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A proxy to the S3 server that answers the first ``failures`` requests of ``method``
    with 503 SlowDown."""

    protocol_version = "HTTP/1.1"  # answers boto3's "Expect: 100-continue" at once
    target = ""
    method = "PUT"
    failures = 0
    seen: list[int] = []

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.command == type(self).method and type(self).failures > 0:
            type(self).failures -= 1
            type(self).seen.append(503)
            reply = b"<Error><Code>SlowDown</Code><Message>slow down</Message></Error>"
            self.send_response(503)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
            return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in ("host", "expect", "connection")
        }
        # Without a type urllib says form data, which the server would parse away.
        headers.setdefault("Content-Type", "binary/octet-stream")
        request = urllib.request.Request(
            self.target + self.path, data=body if body else None, method=self.command,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(request) as response:
                status, headers, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            status, headers, payload = e.code, e.headers, e.read()
        type(self).seen.append(status)
        self.send_response(status)
        for k, v in headers.items():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _flaky_proxy(method: str) -> Iterator[str]:
    _Flaky.target, _Flaky.method = os.environ["AWS_ENDPOINT_URL_S3"], method
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_streamed_reads_are_retried(moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``open_read`` (a presigned GET, not boto3's) retries 5xx as boto3 would, tells a missing
    object from a refusal, and streams the bytes unchanged."""
    data = bytes(range(256)) * 4000
    uri = f"s3://{moto_s3}/stream.tar"
    storage.write_bytes(uri, data)
    with _flaky_proxy("GET") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy)
        _Flaky.failures, _Flaky.seen = 2, []
        body = storage.open_read(uri)
        parts = []
        while chunk := body.read(100_000):
            parts.append(chunk)
        body.close()
        assert b"".join(parts) == data and _Flaky.seen == [503, 503, 200]
        with pytest.raises(FileNotFoundError, match="missing.tar does not exist"):
            storage.open_read(f"s3://{moto_s3}/missing.tar")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        _Flaky.failures, _Flaky.seen = 1, []
        with pytest.raises(OSError, match="HTTP 503 SlowDown"):
            storage.open_read(uri)
        assert _Flaky.seen == [503]


def test_uploads_are_retried(tmp_path: Path, moto_s3: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with _flaky_proxy("PUT") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy)
        path = tmp_path / "shard.tar"
        path.write_bytes(b"x" * 1000)
        _Flaky.failures, _Flaky.seen = 2, []
        storage.upload_file(path, f"s3://{moto_s3}/a.tar")
        assert _Flaky.seen == [503, 503, 200]
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", _Flaky.target)  # read it from the server
        assert storage.read_bytes(f"s3://{moto_s3}/a.tar") == b"x" * 1000
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy)
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        _Flaky.failures, _Flaky.seen = 1, []
        with pytest.raises(UpstreamError, match=r"upload of .*shard\.tar to s3://.*/b\.tar failed"):
            storage.upload_file(path, f"s3://{moto_s3}/b.tar")
        assert _Flaky.seen == [503]
