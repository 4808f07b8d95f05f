"""The reader: load_split, kshot_indices, Stream (resampling, ranks, workers); damaged shards,
locally and on S3 through moto; real torch.distributed ranks that must not hang."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import itertools
import json
import logging
import multiprocessing as mp
import os
import shutil
import socket
import tarfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from upstream import storage
from upstream.errors import UpstreamError
from upstream.shards import loader
from upstream.shards.stage import ShardConfig, shard

CONFIG = dict(source="digits", num_classes=3, samples_per_class=10, image_size=16, shard_size=8)
N = 30


pytestmark = pytest.mark.usefixtures("tracking_home")


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, tracking_home: Path) -> Path:
    """30 digits (3 classes × 10) in 4 shards of 8, 8, 8, 6."""
    out = tmp_path_factory.mktemp("sets") / "digits"
    shard(ShardConfig.parse(output=str(out), **CONFIG))
    return out


@pytest.fixture(scope="module")
def reference(shards: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return loader.load_split(str(shards))


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


def rewrite_shards(
    folder: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]
) -> None:
    """Pass every member of every shard through ``change`` (None drops it) and update the
    manifest's sizes and hashes, as if the shard stage had written the result."""
    manifest = json.loads((folder / "manifest.json").read_text())
    for entry in manifest["shards"]:
        path = folder / entry["name"]
        with tarfile.open(path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, data in members:
                changed = change(name, data)
                if changed is None:
                    continue
                info = tarfile.TarInfo(changed[0])
                info.size = len(changed[1])
                tar.addfile(info, io.BytesIO(changed[1]))
        path.write_bytes(buf.getvalue())
        entry["size"] = len(buf.getvalue())
        entry["sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """Member name → (header offset, data offset) in a tar file."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar}


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


def test_unlabelled_samples_get_minus_one(damaged: Path, reference: Any) -> None:
    """Caption data without ``cls``: label -1, captions and images as before."""
    rewrite_shards(damaged, lambda name, data: None if name.endswith(".cls") else (name, data))
    images, labels, captions = loader.load_split(str(damaged))
    assert labels.tolist() == [loader.UNLABELLED] * N
    assert torch.equal(images, reference[0]) and captions == reference[2]
    _, streamed, _, _ = collect(loader.stream(str(damaged), batch_size=8, num_workers=2))
    assert streamed.tolist() == [-1] * N


@pytest.mark.parametrize("ext", ["webp", "jpeg", "jpg"])
def test_image_keys(damaged: Path, reference: Any, ext: str) -> None:
    def recode(name: str, data: bytes) -> tuple[str, bytes]:
        if not name.endswith(".png"):
            return name, data
        buf = io.BytesIO()
        # Lossless where the format allows, so the pixels can be compared exactly.
        kw = {"lossless": True} if ext == "webp" else {"quality": 100}
        Image.open(io.BytesIO(data)).save(buf, format="WEBP" if ext == "webp" else "JPEG", **kw)
        return name.replace(".png", f".{ext}"), buf.getvalue()

    rewrite_shards(damaged, recode)
    images, labels, _ = loader.load_split(str(damaged))
    assert torch.equal(labels, reference[1])
    if ext == "webp":
        assert torch.equal(images, reference[0])
    else:  # JPEG is lossy even at quality 100, but close
        assert float((images - reference[0]).abs().mean()) < 0.02


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


# --- Stream: one pass --------------------------------------------------------------------------


def test_stream_reads_every_sample_once_per_epoch(shards: Path, reference: Any) -> None:
    all_images, all_labels, _ = reference
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


def test_stream_unshuffled_is_key_order_without_captions(shards: Path, reference: Any) -> None:
    all_images, all_labels, _ = reference
    s = loader.stream(
        str(shards), batch_size=8, shuffle_seed=None, with_captions=False, drop_last=True
    )
    images, labels, captions, sizes = collect(s)
    assert sizes == [8, 8, 8] and len(s) == 3
    assert torch.equal(images, all_images[:24]) and torch.equal(labels, all_labels[:24])
    assert captions == [""] * 24


def test_stream_with_workers(shards: Path, reference: Any) -> None:
    all_images = reference[0]
    s = loader.stream(str(shards), batch_size=5, shuffle_seed=0, num_workers=2)
    # Batches are held (collect keeps them all), so workers cannot reuse their buffers:
    # nothing may be overwritten.
    images, _, _, sizes = collect(s)
    # Two workers with two shards each (16 and 14 samples): 4 + 3 batches, exactly once each.
    assert len(s) == 7 and len(sizes) == 7 and sum(sizes) == s.num_samples == N
    assert sorted(image_ids(images)) == sorted(image_ids(all_images))
    # Same seed and epoch, same order (the DataLoader's round robin over workers is fixed).
    assert image_ids(collect(s)[0]) == image_ids(images)


def _worker_pid(img: Image.Image) -> torch.Tensor:
    return torch.tensor([float(os.getpid())])


def test_set_epoch_keeps_the_workers(shards: Path, reference: Any) -> None:
    s = loader.stream(str(shards), batch_size=5, num_workers=2)
    pids = loader.stream(str(shards), batch_size=5, num_workers=2, transform=_worker_pid)
    orders, workers = [], set()
    # Batches of epoch 0 held through the next epochs: their buffers must not be reused.
    held = [(x, x.clone()) for x, _, _ in s]
    for epoch in range(3):
        s.set_epoch(epoch)
        pids.set_epoch(epoch)
        images, _, _, sizes = collect(s)
        assert sum(sizes) == s.num_samples == N and len(sizes) == len(s)
        assert sorted(image_ids(images)) == sorted(image_ids(reference[0]))
        orders.append(image_ids(images))
        workers |= {int(p) for p in collect(pids)[0].flatten().tolist()}
    assert len(set(map(tuple, orders))) == 3  # every epoch its own order
    assert len(workers) == 2 and os.getpid() not in workers  # the same two processes throughout
    assert all(torch.equal(a, b) for a, b in held)
    s.set_epoch(1)
    assert image_ids(collect(s)[0]) == orders[1]  # an epoch read again is the same
    s.close()
    assert image_ids(collect(s)[0]) == orders[1]  # closed: new workers start when needed


def test_reused_buffers_never_overwrite_a_held_batch(damaged: Path) -> None:
    """Workers reuse a batch buffer only once the consumer has dropped the batch: checked by
    holding every other batch and comparing each against a copy taken when it arrived."""
    # More batches than a worker's buffers, so that reuse happens.
    big = damaged.parent / "big"
    shard(ShardConfig.parse(output=str(big), **{**CONFIG, "samples_per_class": 40}))
    s = loader.stream(str(big), batch_size=3, shuffle_seed=0, num_workers=2)
    held, copies, seen = [], [], []
    for i, (x, _, _) in enumerate(s):
        seen.extend(image_ids(x))
        if i % 2 == 0:
            held.append(x)
            copies.append(x.clone())
    assert sorted(seen) == sorted(image_ids(loader.load_split(str(big))[0]))
    assert all(torch.equal(h, c) for h, c in zip(held, copies, strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_tensors_are_those_of_the_transform(shards: Path, workers: int) -> None:
    """A transform ending in ToTensor is finished straight into the batch (no intermediate
    tensors); the numbers must be exactly those of running the transform."""
    from torchvision import transforms as T

    cases = [
        T.Compose([T.CenterCrop(12), T.ToTensor()]),
        T.ToTensor(),
        T.Compose([T.Grayscale(), T.ToTensor()]),  # mode L: not fused, same result
        T.Compose([T.ToTensor(), T.Normalize([0.5] * 3, [0.2] * 3)]),  # not ending in ToTensor
    ]
    for transform in cases:
        expected = loader.load_split(str(shards), transform=transform)[0]
        got = collect(loader.stream(str(shards), batch_size=8, shuffle_seed=None,
                                    transform=transform, num_workers=workers))[0]
        assert got.dtype == torch.float32
        if workers == 0:  # key order
            assert torch.equal(got, expected), transform
        else:
            assert sorted(image_ids(got)) == sorted(image_ids(expected)), transform


def test_transform_must_give_one_shape(shards: Path) -> None:
    sizes = iter(range(1, 100))

    def varying(img: Image.Image) -> torch.Tensor:
        return torch.zeros(3, next(sizes), 4)

    with pytest.raises(UpstreamError, match=r"shape \(3, 2, 4\) but an earlier one \(3, 1, 4\)"):
        collect(loader.stream(str(shards), batch_size=4, transform=varying))
    with pytest.raises(UpstreamError, match="must return a tensor"):
        collect(loader.stream(str(shards), batch_size=4, transform=lambda img: img))


# --- Stream: ranks, resampling, equal batches ---------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_resampled_fixed_batches_per_rank(shards: Path, world: int, workers: int) -> None:
    expected = N // (4 * world)
    per_rank = []
    for rank in range(world):
        s = loader.stream(str(shards), batch_size=4, resampled=True, shuffle_seed=1,
                          num_workers=workers, rank=rank, world_size=world)
        assert len(s) == expected and s.num_samples == expected * 4
        images, labels, _, sizes = collect(s)
        assert sizes == [4] * expected  # full batches only
        assert set(labels.tolist()) <= {0, 1, 2}
        per_rank.append(image_ids(images))
        # Deterministic: the same (seed, epoch, rank) gives the same draws.
        assert image_ids(collect(s)[0]) == per_rank[-1]
    if world > 1:
        assert per_rank[0] != per_rank[1]  # every rank draws its own


def test_resampled_batches_per_epoch_and_epochs(shards: Path, reference: Any) -> None:
    s = loader.stream(str(shards), batch_size=4, resampled=True, batches_per_epoch=11,
                      num_workers=2)
    images, _, _, sizes = collect(s)
    assert len(s) == 11 and sizes == [4] * 11
    assert set(image_ids(images)) <= set(image_ids(reference[0]))
    other = collect(loader.stream(str(shards), batch_size=4, resampled=True, batches_per_epoch=11,
                                  num_workers=2, epoch=1))[0]
    assert image_ids(other) != image_ids(images)


@pytest.mark.parametrize("workers", [0, 2])
def test_equal_batches_on_every_rank_without_resampling(
    shards: Path, reference: Any, workers: int, caplog: pytest.LogCaptureFixture
) -> None:
    """3 ranks over shards of 8, 8, 8, 6 (unshuffled: rank 0 gets the 8 and the 6, ranks 1
    and 2 an 8 each): all stop at the count of the ranks with fewest, no sample comes twice."""
    counts, samples, everything = [], [], []
    with caplog.at_level(logging.WARNING, logger="upstream.shards.loader"):
        for rank in range(3):
            s = loader.stream(str(shards), batch_size=3, num_workers=workers, rank=rank,
                              world_size=3, shuffle_seed=None)
            images, _, _, sizes = collect(s)
            assert len(sizes) == len(s) and sum(sizes) == s.num_samples
            counts.append(len(s))
            samples.append(s.num_samples)
            everything.extend(image_ids(images))
    assert counts == [3, 3, 3]  # 8 samples in batches of 3: 3 batches (3, 3, 2)
    assert samples == [9, 8, 8]  # rank 0 could give 5 batches (14 samples); it gives 3 full
    assert len(everything) == len(set(everything)) == 25
    assert set(everything) <= set(image_ids(reference[0]))
    assert "fewer than 8 per reader" in caplog.text
    # Shuffled shards: the counts differ per epoch, but never between ranks.
    for epoch in range(4):
        lengths = {len(loader.stream(str(shards), batch_size=3, num_workers=workers, rank=r,
                                     world_size=3, epoch=epoch)) for r in range(3)}
        assert len(lengths) == 1


def test_plan_matches_the_dataloader_order() -> None:
    counts = [10, 10, 10, 3]
    plan = loader.plan_epoch(counts, batch_size=4, workers=2, rank=0, world_size=1, epoch=0,
                             shuffle_seed=None, drop_last=False, resampled=False,
                             batches_per_epoch=None)
    # Worker 0: shards 0 and 2 (20 samples: 5 batches); worker 1: 1 and 3 (13: 4 batches).
    assert plan.shards == ((0, 2), (1, 3)) and plan.batches == (5, 4)
    assert plan.num_batches == 9 and plan.num_samples == 33 and plan.dropped == 0
    ranks = [loader.plan_epoch(counts, batch_size=4, workers=1, rank=r, world_size=2, epoch=0,
                               shuffle_seed=None, drop_last=False, resampled=False,
                               batches_per_epoch=None) for r in range(2)]
    # Rank 0: 20 samples (5 batches), rank 1: 13 (4 batches): both give 4.
    assert [p.num_batches for p in ranks] == [4, 4] and [p.dropped for p in ranks] == [1, 0]
    assert [p.num_samples for p in ranks] == [16, 13]
    resampled = loader.plan_epoch(counts, batch_size=4, workers=3, rank=1, world_size=2, epoch=0,
                                  shuffle_seed=0, drop_last=False, resampled=True,
                                  batches_per_epoch=None)
    assert resampled.num_batches == 33 // 8 == 4 and resampled.batches == (2, 1, 1)


def test_stream_refuses_what_cannot_work(shards: Path) -> None:
    with pytest.raises(UpstreamError, match="4 shard.*too few for 5 ranks"):
        loader.stream(str(shards), batch_size=2, rank=0, world_size=5)
    # Resampled, 5 ranks are fine: every rank draws from all shards.
    assert len(loader.stream(str(shards), batch_size=2, rank=4, world_size=5,
                             resampled=True)) == 3
    with pytest.raises(UpstreamError, match="gives no batch of 16 to each of 2 rank"):
        loader.stream(str(shards), batch_size=16, rank=0, world_size=2, resampled=True)
    with pytest.raises(UpstreamError, match="needs a shuffle_seed|give a shuffle_seed"):
        loader.stream(str(shards), batch_size=2, resampled=True, shuffle_seed=None)
    with pytest.raises(UpstreamError, match="batches_per_epoch needs resampled=True"):
        loader.stream(str(shards), batch_size=2, batches_per_epoch=3)
    with pytest.raises(UpstreamError, match="rank 2 is outside world size 2"):
        loader.stream(str(shards), batch_size=2, rank=2, world_size=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ddp_rank(rank: int, world: int, port: int, uri: str, resampled: bool, out: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=dt.timedelta(seconds=60))
    try:
        s = loader.stream(uri, batch_size=3, resampled=resampled, shuffle_seed=0,
                          num_workers=1 if rank == 0 else 0)
        steps = 0
        for images, _, _ in s:
            # What a DDP step does: every rank must take part, or the others wait forever.
            total = torch.tensor([float(len(images))])
            dist.all_reduce(total)
            steps += 1
        out.put((rank, steps, len(s)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("resampled", [False, True])
def test_real_ddp_ranks_take_the_same_steps(shards: Path, resampled: bool) -> None:
    """Three gloo ranks with unequal shards step together to the end of the epoch."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_ddp_rank, args=(r, 3, port, str(shards), resampled, out))
             for r in range(3)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
        results = sorted(out.get(timeout=5) for _ in procs)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    steps = {steps for _, steps, _ in results}
    assert len(steps) == 1 and steps == {n for _, _, n in results}
    # Resampled: 30 // (3 × 3) batches; else as many as the rank with fewest samples gives.
    fewest = min(loader.plan_epoch([8, 8, 8, 6], batch_size=3, workers=1, rank=r, world_size=3,
                                   epoch=0, shuffle_seed=0, drop_last=False, resampled=False,
                                   batches_per_epoch=None).batches[0] for r in range(3))
    assert steps == ({N // 9} if resampled else {fewest})


# --- damaged shards ----------------------------------------------------------------------------


def test_truncated_shard_names_shard_and_key(damaged: Path) -> None:
    path = damaged / "shard-000001.tar"
    # Cut inside the image of the sixth sample (keys 000008..000015 live in this shard).
    _, data_at = member_offsets(path)["000013.png"]
    path.write_bytes(path.read_bytes()[: data_at + 10])
    pattern = (r"shard .*shard-000001\.tar is corrupt or truncated \(reading 000013\.png, "
               r"after sample 000012\)")
    with pytest.raises(UpstreamError, match=pattern):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=pattern):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))
    with pytest.raises(UpstreamError, match=pattern):  # from a worker, still one line
        collect(loader.stream(str(damaged), batch_size=4, num_workers=2))
    try:
        collect(loader.stream(str(damaged), batch_size=4, num_workers=2))
    except UpstreamError as e:
        assert "\n" not in str(e)


def test_shard_cut_between_members_is_caught(damaged: Path) -> None:
    path = damaged / "shard-000002.tar"
    header_at, _ = member_offsets(path)["000019.cls"]
    # A valid tar that simply ends after three samples: only the counts can tell.
    path.write_bytes(path.read_bytes()[:header_at])
    pattern = (r"shard .*shard-000002\.tar is corrupt or truncated: it ends after sample "
               r"000018 with 3 samples; the manifest says 8")
    with pytest.raises(UpstreamError, match=pattern):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=pattern):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))


@pytest.mark.parametrize(
    ("offset", "garbage", "problem"),
    [(148, b"garbage!", "an unreadable tar header"),  # the checksum field itself
     (3, b"X", "a tar header with a wrong checksum")],  # a byte of the member's name
)
def test_corrupt_header_names_shard_and_key(
    damaged: Path, offset: int, garbage: bytes, problem: str
) -> None:
    """(Python's tarfile would stop quietly at such a header, as if the shard ended there.)"""
    path = damaged / "shard-000000.tar"
    header_at, _ = member_offsets(path)["000004.json"]
    data = bytearray(path.read_bytes())
    data[header_at + offset : header_at + offset + len(garbage)] = garbage
    path.write_bytes(bytes(data))
    pattern = (rf"shard .*shard-000000\.tar is corrupt or truncated \(after sample 000003\): "
               rf"{problem}")
    with pytest.raises(UpstreamError, match=pattern):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=pattern):
        collect(loader.stream(str(damaged), batch_size=4, num_workers=2))


def test_data_after_the_end_marker_is_corrupt(damaged: Path) -> None:
    path = damaged / "shard-000003.tar"
    with tarfile.open(path) as tar:
        tar.getmembers()
        end = tar.offset  # where the end-of-archive blocks start
    data = bytearray(path.read_bytes())
    data[end + 1024 + 7] = 1
    path.write_bytes(bytes(data))
    with pytest.raises(UpstreamError, match=r"shard-000003\.tar is corrupt or truncated \(after "
                                            r"sample 000028\): data follows its end-of-archive"):
        loader.load_split(str(damaged))


def test_corrupt_image_names_shard_and_key(damaged: Path) -> None:
    path = damaged / "shard-000003.tar"
    _, data_at = member_offsets(path)["000026.png"]
    data = bytearray(path.read_bytes())
    data[data_at : data_at + 8] = b"\x00" * 8  # the PNG signature
    path.write_bytes(bytes(data))
    with pytest.raises(UpstreamError, match=r"cannot decode image 000026 in .*shard-000003\.tar"):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))


def test_flipped_bits_fail_the_hash(damaged: Path) -> None:
    path = damaged / "shard-000001.tar"
    _, data_at = member_offsets(path)["000010.txt"]
    data = bytearray(path.read_bytes())
    data[data_at] ^= 0x01  # "a photo ..." → "` photo ...": still a valid tar and caption
    path.write_bytes(bytes(data))
    with pytest.raises(UpstreamError, match=r"shard .*shard-000001\.tar is corrupt: its sha256"):
        loader.load_split(str(damaged))


def test_missing_shard_is_named(damaged: Path) -> None:
    (damaged / "shard-000003.tar").unlink()
    with pytest.raises(UpstreamError, match=r"shard-000003\.tar is missing"):
        loader.load_split(str(damaged))
    with pytest.raises(UpstreamError, match=r"shard-000003\.tar is missing"):
        collect(loader.stream(str(damaged), batch_size=4, shuffle_seed=None))


def test_plain_reader_skips_samples_without_image(tmp_path: Path) -> None:
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.txt", b"no image"), ("b.png", b"img"), ("b.cls", b"1"),
                           ("__meta__.json", b"{}"), ("c.jpg", b"img2")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = list(loader.read_shard(str(path), {"num_samples": 2}))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("b", ["cls", "png"]), ("c", ["jpg"])
    ]


# --- S3 ----------------------------------------------------------------------------------------


def upload(folder: Path, uri: str) -> None:
    for path in sorted(folder.iterdir()):
        if path.is_file():
            storage.upload_file(path, f"{uri}/{path.name}")


def test_s3_round_trip(moto_s3: str, shards: Path, reference: Any) -> None:
    uri = f"s3://{moto_s3}/digits"
    shard(ShardConfig.parse(output=uri, **CONFIG))
    remote = loader.load_split(uri)
    assert torch.equal(remote[0], reference[0]) and torch.equal(remote[1], reference[1])
    assert remote[2] == reference[2]
    assert loader.shard_urls(uri)[0] == f"{uri}/shard-000000.tar"
    images, labels, _, _ = collect(loader.stream(uri, batch_size=16, shuffle_seed=None))
    assert torch.equal(images, reference[0]) and torch.equal(labels, reference[1])
    images, _, _, sizes = collect(loader.stream(uri, batch_size=4, num_workers=2,
                                                resampled=True))
    assert sizes == [4] * (N // 4)


def test_s3_missing_set_and_shard(moto_s3: str) -> None:
    with pytest.raises(UpstreamError, match=r"no shards at s3://.*/nothing \(manifest\.json"):
        loader.read_manifest(f"s3://{moto_s3}/nothing")
    uri = f"s3://{moto_s3}/digits"
    shard(ShardConfig.parse(output=uri, **CONFIG))
    storage.remove_file(f"{uri}/shard-000002.tar")
    with pytest.raises(UpstreamError, match=r"shard s3://.*/shard-000002\.tar is missing"):
        collect(loader.stream(uri, batch_size=4, shuffle_seed=None))


def test_s3_truncated_and_corrupt_shards(moto_s3: str, shards: Path, damaged: Path) -> None:
    path = damaged / "shard-000001.tar"
    _, data_at = member_offsets(path)["000013.png"]
    path.write_bytes(path.read_bytes()[: data_at + 10])
    upload(damaged, f"s3://{moto_s3}/truncated")
    shutil.copyfile(shards / path.name, path)
    path = damaged / "shard-000000.tar"
    header_at, _ = member_offsets(path)["000004.json"]
    data = bytearray(path.read_bytes())
    data[header_at + 148 : header_at + 156] = b"garbage!"
    path.write_bytes(bytes(data))
    upload(damaged, f"s3://{moto_s3}/corrupt")
    truncated = (r"shard s3://.*/truncated/shard-000001\.tar is corrupt or truncated \(reading "
                 r"000013\.png, after sample 000012\)")
    corrupt = (r"shard s3://.*/corrupt/shard-000000\.tar is corrupt or truncated \(after sample "
               r"000003\): an unreadable tar header")
    for name, pattern in [("truncated", truncated), ("corrupt", corrupt)]:
        uri = f"s3://{moto_s3}/{name}"
        with pytest.raises(UpstreamError, match=pattern):
            loader.load_split(uri)
        with pytest.raises(UpstreamError, match=pattern):
            collect(loader.stream(uri, batch_size=4, num_workers=2))


# --- resuming inside an epoch ----------------------------------------------------------------


def _random_crop() -> Any:
    from torchvision import transforms as T

    return T.Compose([T.RandomResizedCrop(12, scale=(0.3, 1.0)), T.ToTensor()])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_an_epoch_resumed_at_batch_k_gives_the_same_batches(
    shards: Path, workers: int, resampled: bool
) -> None:
    """A run killed after k batches resumes with ``set_epoch(e, start=k)``: the batches after
    k are the same samples, randomly transformed the same way, as in the whole epoch."""
    kw = dict(batch_size=3, num_workers=workers, transform=_random_crop(), shuffle_seed=5,
              resampled=resampled)
    whole = loader.stream(str(shards), **kw)
    whole.set_epoch(2)
    full = [(x.clone(), y.clone()) for x, y, _ in whole]
    assert len(full) >= 8
    again = [(x.clone(), y.clone()) for x, y, _ in whole]  # per-batch seeds: same crops again
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, again, strict=True))
    for start in (1, 4, len(full) - 1):
        resumed = loader.stream(str(shards), **kw)
        resumed.set_epoch(2, start=start)
        assert len(resumed) == len(full) - start
        rest = [(x.clone(), y.clone()) for x, y, _ in resumed]
        assert len(rest) == len(full) - start
        for (x, y), (fx, fy) in zip(rest, full[start:], strict=True):
            assert torch.equal(y, fy) and torch.equal(x, fx)


def test_batch_seeds_leave_the_training_generator_alone(shards: Path) -> None:
    """In-process reading seeds torch per batch, then gives the caller its generator back."""
    s = loader.stream(str(shards), batch_size=3, transform=_random_crop(), shuffle_seed=5)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    for _ in s:
        pass
    assert torch.equal(torch.rand(3), expected)


def test_start_outside_the_epoch_is_refused(shards: Path) -> None:
    s = loader.stream(str(shards), batch_size=3, shuffle_seed=5)
    with pytest.raises(UpstreamError, match="cannot start at batch 99"):
        s.set_epoch(0, start=99)


def test_skips_follow_the_dataloader_round_robin() -> None:
    assert loader.skips_per_worker([3, 3], 3) == [2, 1]
    assert loader.skips_per_worker([1, 3], 3) == [1, 2]  # worker 0 done after its one batch
    assert loader.skips_per_worker([2, 2, 2], 0) == [0, 0, 0]


def test_tokenizer_runs_in_the_readers(shards: Path) -> None:
    """With a tokenizer, batches carry token rows made from the captions by the workers."""
    from upstream import models

    tok = models.tokenizer("upstream-tiny-rn")
    for workers in (0, 2):
        plain = collect(loader.stream(str(shards), batch_size=4, shuffle_seed=3,
                                      num_workers=workers))
        s = loader.stream(str(shards), batch_size=4, shuffle_seed=3, tokenizer=tok,
                          num_workers=workers)
        tokens = torch.cat([t for _, _, t in s])
        assert torch.equal(tokens, tok(plain[2]))


def _encoded(mode: str, fmt: str) -> bytes:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray((rng.random((13, 21, 3)) * 255).astype(np.uint8))
    image = (Image.fromarray(np.asarray(rgb)[..., 0].astype(np.uint16) * 250)
             if mode == "I;16" else rgb.convert(mode))
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(("mode", "fmt"), [
    ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("1", "PNG"),
    ("I;16", "PNG"),  # 16 bits: torchvision gives uint16, so PIL decodes it
    ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "WEBP"),
])
def test_native_decoding_gives_the_numbers_of_pil(mode: str, fmt: str) -> None:
    """The fast path (torchvision's decoder straight to CHW uint8) and PIL's
    ``convert("RGB")`` + ToTensor give identical tensors, format by format."""
    data = _encoded(mode, fmt)
    fast = loader.decode_chw(data, "sample x")
    assert fast.dtype == torch.uint8 and fast.shape == (3, 13, 21)
    assert torch.equal(fast.float().div(255), loader.to_tensor(loader.decode_image(data, "x")))


def test_native_decoding_of_bad_bytes_is_a_one_line_error() -> None:
    with pytest.raises(UpstreamError, match=r"^cannot decode image 000007 in s3://b/s\.tar: "):
        loader.decode_chw(b"\x89PNG\r\n\x1a\n not really", "000007 in s3://b/s.tar")


def test_tar_headers_summed_as_signed_bytes_are_read() -> None:
    """Some old tars sum the header as signed chars; tarfile reads them, and so does this
    reader (its fast unsigned check fails on them, the signed one must pass)."""
    from upstream.shards.tarread import Blocks, TarMembers

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("é/000001.txt")  # bytes ≥ 128 in the name
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    data = bytearray(out.getvalue())
    header = data[:512]
    header[148:156] = b" " * 8
    signed = sum(b - 256 if b >= 128 else b for b in header)
    assert signed != sum(header)
    data[148:156] = b"%06o\0 " % signed
    assert list(TarMembers(Blocks(io.BytesIO(bytes(data))))) == [("é/000001.txt", b"hi")]
    data[148:156] = b"%06o\0 " % (signed + 1)
    with pytest.raises(Exception, match="wrong checksum"):
        list(TarMembers(Blocks(io.BytesIO(bytes(data)))))


# --- Stream.epochs: continuous reading across epochs -------------------------------------------


def _take(it: Any, n: int) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
    return [(e, i, x.clone(), y.clone()) for e, i, (x, y, _) in itertools.islice(it, n)]


def _positions(stream: loader.Stream, epochs: int) -> list[tuple[int, int]]:
    return [(e, i) for e in range(epochs) for i in range(stream.settings.plan(e).num_batches)]


def _same_epoch_content(run: list[Any], epoch: int, alone: loader.Stream, complete: bool) -> None:
    """Epoch ``epoch`` of ``run`` against the epoch read alone: as many samples, none twice,
    all from the epoch's shards; with ``complete``, the very same samples."""
    got = image_ids(torch.cat([x for e, _, x, _ in run if e == epoch]))
    alone.set_epoch(epoch)
    expected = image_ids(torch.cat([x for x, _, _ in alone]))
    assert len(got) == len(expected) == len(set(got))
    if complete:
        assert sorted(got) == sorted(expected)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("resampled", [False, True])
def test_epochs_run_on_without_restarts_and_resume_anywhere(
    shards: Path, workers: int, resampled: bool
) -> None:
    """``epochs()`` tags batches with their epoch and index; every epoch holds what that epoch
    holds when read alone (without resampling: every sample once); a stream resumed at any
    (epoch, index) continues with exactly the batches of the uninterrupted one, random
    transforms included."""
    kw = dict(batch_size=3, num_workers=workers, transform=_random_crop(), shuffle_seed=5,
              resampled=resampled, shuffle_buffer=7)
    s = loader.stream(str(shards), **kw)
    positions = _positions(s, 4)
    run = _take(s.epochs(0), len(positions))
    assert [(e, i) for e, i, _, _ in run] == positions
    again = _take(s.epochs(0), len(run))  # the same again, batch by batch
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
               for a, b in zip(run, again, strict=True))
    if not resampled:  # (images as stored: the random crops depend on a batch's samples)
        plain = {**kw, "transform": None}
        stored = _take(loader.stream(str(shards), **plain).epochs(0), len(positions))
        for epoch in range(4):
            _same_epoch_content(stored, epoch, loader.stream(str(shards), **plain), True)
    for at in (1, positions.index((1, 0)) - 1, positions.index((1, 0)) + 2):
        epoch, index = positions[at]
        resumed = loader.stream(str(shards), **kw)
        rest = _take(resumed.epochs(epoch, start=index), len(run) - at)
        for (e, i, x, y), (fe, fi, fx, fy) in zip(rest, run[at:], strict=True):
            assert (e, i) == (fe, fi)
            assert torch.equal(y, fy) and torch.equal(x, fx)


def test_epochs_with_unequal_worker_shares_stay_in_step(tmp_path: Path) -> None:
    """Shards of unequal size give the two workers unequal batch counts per epoch (surplus
    batches dropped to match the other rank, markers from the worker with fewer): over many
    epochs the batches still come in every epoch's order, without the readers drifting apart
    (no fresh batch buffers beyond the workers' slots)."""
    out = tmp_path / "uneven"
    shard(ShardConfig.parse(output=str(out), **{**CONFIG, "shard_size": 7}))  # 7, 7, 7, 7, 2
    kw = dict(batch_size=2, num_workers=2, shuffle_seed=1, drop_last=True, world_size=2, rank=1)
    s = loader.stream(str(out), **kw)
    positions = _positions(s, 12)
    run = _take(s.epochs(0), len(positions))
    assert [(e, i) for e, i, _, _ in run] == positions
    for epoch in range(12):
        # drop_last: each worker leaves out its own last, partial batch.
        _same_epoch_content(run, epoch, loader.stream(str(out), **kw), complete=False)
    assert len(s._slots) <= 2 * loader.SLOTS_PER_WORKER
