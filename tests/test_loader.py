"""The reader: load_split, kshot_indices, stream; damaged shards; S3 through moto."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from upstream import loader
from upstream.errors import UpstreamError
from upstream.shard import ShardConfig, shard

CONFIG = dict(source="digits", num_classes=3, samples_per_class=10, image_size=16, shard_size=8)
N = 30


pytestmark = pytest.mark.usefixtures("tracking_home")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tracking_home: Path) -> Path:
    """30 digits (3 classes × 10) in 4 shards of 8, 8, 8, 6."""
    out = tmp_path_factory.mktemp("sets") / "digits"
    shard(ShardConfig.parse(output=str(out), **CONFIG))
    return out


@pytest.fixture
def damaged(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    return copy


def tar_samples(folder: Path) -> list[dict[str, bytes]]:
    """Samples straight from the tars, in key order: the reference the loader must match."""
    out: dict[str, dict[str, bytes]] = {}
    for path in sorted(folder.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return [out[k] for k in sorted(out)]


def image_ids(images: torch.Tensor) -> list[str]:
    return [hashlib.sha1(x.numpy().tobytes()).hexdigest() for x in images]


def collect(batches: Any) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    xs, ys, cs, sizes = [], [], [], []
    for x, y, c in batches:
        xs.append(x), ys.append(y), cs.extend(c), sizes.append(len(y))
    return torch.cat(xs), torch.cat(ys), cs, sizes


# --- load_split --------------------------------------------------------------------------------


def test_load_split_round_trip(shards: Path) -> None:
    images, labels, captions = loader.load_split(str(shards))
    assert images.shape == (N, 3, 16, 16) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.max()) > 0.5  # not all black: the digits' ink is there
    reference = tar_samples(shards)
    assert labels.tolist() == [int(s["cls"]) for s in reference]
    assert captions == [s["txt"].decode() for s in reference]
    assert Counter(labels.tolist()) == {0: 10, 1: 10, 2: 10}
    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(reference[0]["png"])), dtype=np.float32) / 255
    assert torch.allclose(images[0], torch.from_numpy(first).permute(2, 0, 1))


def test_load_split_indices_and_transform(shards: Path) -> None:
    images, labels, captions = loader.load_split(str(shards))
    sub_images, sub_labels, sub_captions = loader.load_split(str(shards), indices=[29, 0, 5])
    assert torch.equal(sub_images, images[[29, 0, 5]])
    assert sub_labels.tolist() == labels[[29, 0, 5]].tolist()
    assert sub_captions == [captions[i] for i in (29, 0, 5)]
    small, _, _ = loader.load_split(
        str(shards), transform=lambda im: torch.zeros(1, 2, 2), indices=[1, 2]
    )
    assert small.shape == (2, 1, 2, 2)
    with pytest.raises(UpstreamError, match="index 30 is out of range"):
        loader.load_split(str(shards), indices=[30])


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError, match=r"no shards at .* \(manifest\.json missing\)"):
        loader.read_manifest(str(tmp_path))
    with pytest.raises(UpstreamError, match="manifest.json missing"):
        loader.load_split(str(tmp_path / "nothing"))


def test_shard_urls(shards: Path) -> None:
    assert loader.shard_urls(str(shards)) == [str(shards / f"shard-00000{i}.tar") for i in range(4)]


# --- kshot_indices -----------------------------------------------------------------------------


def test_kshot_indices_exact_and_seeded() -> None:
    labels = np.array([0] * 5 + [1] * 3 + [2] * 7)
    idx = loader.kshot_indices(labels, 2, seed=0)
    assert idx == sorted(idx) and len(set(idx)) == 6
    assert Counter(labels[idx].tolist()) == {0: 2, 1: 2, 2: 2}
    assert loader.kshot_indices(torch.as_tensor(labels), 2, seed=0) == idx
    assert any(loader.kshot_indices(labels, 2, seed=s) != idx for s in range(1, 5))
    assert loader.kshot_indices(labels, 0, seed=0) == list(range(15))
    assert Counter(labels[loader.kshot_indices(labels, 3, seed=1)].tolist()) == {0: 3, 1: 3, 2: 3}


def test_kshot_too_many_shots() -> None:
    labels = [0] * 5 + [1] * 3
    with pytest.raises(UpstreamError, match="k=4 shots per class, but class 1 has only 3"):
        loader.kshot_indices(labels, 4, seed=0)
    with pytest.raises(UpstreamError, match=r"class 2 \(cow\) has only 0"):
        loader.kshot_indices(labels, 1, seed=0, class_names=["ant", "bee", "cow"])
    with pytest.raises(UpstreamError, match="must be ≥ 0"):
        loader.kshot_indices(labels, -1, seed=0)


# --- stream ------------------------------------------------------------------------------------


def test_stream_reads_every_sample_once_per_epoch(shards: Path) -> None:
    all_images, all_labels, _ = loader.load_split(str(shards))
    s = loader.stream(str(shards), batch_size=7, shuffle_seed=3, epoch=0)
    images, labels, captions, sizes = collect(s)
    assert sizes == [7, 7, 7, 7, 2] and len(s) == 5 and s.num_samples == N
    assert sorted(image_ids(images)) == sorted(image_ids(all_images))
    assert Counter(labels.tolist()) == Counter(all_labels.tolist())
    assert all(c.startswith("a photo of the digit ") for c in captions)
    # Shuffled: not key order; the same (seed, epoch) gives the same order, another epoch not.
    assert image_ids(images) != image_ids(all_images)
    again = collect(loader.stream(str(shards), batch_size=7, shuffle_seed=3, epoch=0))[0]
    assert image_ids(again) == image_ids(images)
    epoch1 = collect(loader.stream(str(shards), batch_size=7, shuffle_seed=3, epoch=1))[0]
    assert image_ids(epoch1) != image_ids(images)
    # A stream is re-iterable, each pass a full epoch.
    assert sum(len(y) for _, y, _ in s) == N


def test_stream_unshuffled_is_key_order_without_captions(shards: Path) -> None:
    all_images, all_labels, _ = loader.load_split(str(shards))
    s = loader.stream(
        str(shards), batch_size=8, shuffle_seed=None, with_captions=False, drop_last=True
    )
    images, labels, captions, sizes = collect(s)
    assert sizes == [8, 8, 8] and len(s) == 3
    assert torch.equal(images, all_images[:24]) and torch.equal(labels, all_labels[:24])
    assert captions == [""] * 24


def test_stream_with_workers(shards: Path) -> None:
    all_images = loader.load_split(str(shards))[0]
    s = loader.stream(str(shards), batch_size=5, shuffle_seed=0, num_workers=2)
    images, _, _, sizes = collect(s)
    # Two workers with two shards each (16 and 14 samples): 4 + 3 batches, exactly once each.
    assert len(s) == 7 and len(sizes) == 7
    assert sorted(image_ids(images)) == sorted(image_ids(all_images))


def test_empty_samples_are_skipped() -> None:
    """webdataset marks shard ends with ``{}``; samples without an image are dropped too."""
    check = loader._ShardCheck({"a.tar": 2})
    stream = [
        {"__url__": "a.tar", "png": b"1", "__key__": "0"},
        {},
        {"__url__": "a.tar", "cls": b"1", "__key__": "x"},
        {"__url__": "a.tar", "png": b"2", "__key__": "1"},
        {},
    ]
    assert [s["png"] for s in check(iter(stream))] == [b"1", b"2"]
    with pytest.raises(UpstreamError, match=r"shard a\.tar gave 1 samples; the manifest says 2"):
        list(check(iter(stream[:2])))


# --- damaged shards ----------------------------------------------------------------------------


def test_truncated_shard_is_named(damaged: Path) -> None:
    path = damaged / "shard-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])  # cut mid-member
    with pytest.raises(UpstreamError, match=r"shard .*shard-000001\.tar is corrupt or truncated"):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=r"shard .*shard-000001\.tar"):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))


def test_shard_cut_between_members_is_caught(damaged: Path) -> None:
    path = damaged / "shard-000002.tar"
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    # A valid tar that simply ends after three samples: only the counts can tell.
    path.write_bytes(path.read_bytes()[: members[12].offset])
    with pytest.raises(UpstreamError, match=r"shard-000002\.tar"):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=r"shard .*shard-000002\.tar gave 3 samples"):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))


def test_missing_shard_is_named(damaged: Path) -> None:
    (damaged / "shard-000003.tar").unlink()
    with pytest.raises(UpstreamError, match=r"shard-000003\.tar is missing"):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=r"shard-000003\.tar"):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))


# --- S3 ----------------------------------------------------------------------------------------


def test_s3_round_trip(moto_s3: str, shards: Path) -> None:
    uri = f"s3://{moto_s3}/digits"
    shard(ShardConfig.parse(output=uri, **CONFIG))
    local = loader.load_split(str(shards))
    remote = loader.load_split(uri)
    assert torch.equal(remote[0], local[0]) and torch.equal(remote[1], local[1])
    assert remote[2] == local[2]
    assert loader.shard_urls(uri)[0] == f"{uri}/shard-000000.tar"
    images, labels, _, _ = collect(loader.stream(uri, batch_size=16, shuffle_seed=None))
    assert torch.equal(images, local[0]) and torch.equal(labels, local[1])


def test_s3_missing_set_and_shard(moto_s3: str) -> None:
    from upstream import storage

    with pytest.raises(UpstreamError, match=r"no shards at s3://.*/nothing \(manifest\.json"):
        loader.read_manifest(f"s3://{moto_s3}/nothing")
    uri = f"s3://{moto_s3}/digits"
    shard(ShardConfig.parse(output=uri, **CONFIG))
    storage.remove_file(f"{uri}/shard-000002.tar")
    with pytest.raises(UpstreamError, match=r"shard-000002\.tar"):
        collect(loader.stream(uri, batch_size=4, shuffle_seed=None))
