"""Shards written by upstream read by other tools: plain ``webdataset.WebDataset`` (local and
``s3://``) and open_clip_train's training data loader (``--train-data`` with a brace pattern,
``sizes.json``), with and without :func:`upstream.openclip_compat.patch_open_clip`."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from upstream import openclip_compat
from upstream.shards import loader
from upstream.shards.stage import ShardConfig, shard

# 24 digits in 4 shards of 6: open_clip's two workers read two shards each, 12 samples, three
# batches of 4, so that one epoch is every sample exactly once.
CONFIG = dict(source="digits", num_classes=3, samples_per_class=8, image_size=16, shard_size=6)
N = 24

pytestmark = pytest.mark.usefixtures("tracking_home")


@pytest.fixture(scope="module", params=["png", "jpg"])
def written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tracking_home: Path
) -> tuple[Path, str]:
    fmt = request.param
    out = tmp_path_factory.mktemp("compat") / fmt
    shard(ShardConfig.parse(output=str(out), image_format=fmt, **CONFIG))
    if not (out / "sizes.json").exists():
        # STAND-IN: written here only while the shard stage does not write sizes.json itself
        # (issue 3 asks it to); the content is what open_clip's get_dataset_size reads.
        manifest = json.loads((out / "manifest.json").read_text())
        sizes = {s["name"]: s["num_samples"] for s in manifest["shards"]}
        (out / "sizes.json").write_text(json.dumps(sizes))
    return out, fmt


@pytest.fixture
def unpatched() -> Iterator[None]:
    openclip_compat.unpatch_open_clip()
    yield
    openclip_compat.unpatch_open_clip()


def pixels_id(x: torch.Tensor) -> str:
    return hashlib.sha1(x.contiguous().numpy().tobytes()).hexdigest()


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).float().div(255)


def brace_pattern(folder: Path) -> str:
    return str(folder / "shard-{000000..000003}.tar")


# --- plain webdataset --------------------------------------------------------------------------


def check_plain_webdataset(urls: list[str], folder_or_uri: str, fmt: str) -> None:
    images, labels, captions = loader.load_split(folder_or_uri)
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    # Every sample once, in key order, with the keys open_clip and img2dataset users expect.
    assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(N)]
    assert all({fmt, "cls", "txt", "json"} <= set(s) for s in samples)
    assert [s["cls"] for s in samples] == labels.tolist()
    assert [s["txt"] for s in samples] == captions
    assert all(isinstance(s["json"], dict) and "index" in s["json"] for s in samples)
    for s, expected in zip(samples, images, strict=True):
        assert isinstance(s[fmt], Image.Image)
        assert torch.equal(pil_to_tensor(s[fmt]), expected)


def test_plain_webdataset_reads_upstream_shards(written: tuple[Path, str]) -> None:
    folder, fmt = written
    check_plain_webdataset(loader.shard_urls(str(folder)), str(folder), fmt)
    # A brace pattern, as a user would type it, reads the same.
    first = next(iter(wds.WebDataset(brace_pattern(folder), shardshuffle=False).decode("pil")))
    assert first["__key__"] == "000000"


def test_plain_webdataset_reads_from_s3(written: tuple[Path, str], moto_s3: str) -> None:
    """``import upstream.shards.loader`` registers an ``s3://`` opener for webdataset."""
    folder, fmt = written
    uri = f"s3://{moto_s3}/{fmt}"
    shard(ShardConfig.parse(output=uri, image_format=fmt, **CONFIG))
    check_plain_webdataset(loader.shard_urls(uri), uri, fmt)


# --- open_clip_train ---------------------------------------------------------------------------


def open_clip_args(folder: Path, workers: int) -> argparse.Namespace:
    """The fields of open_clip_train's argument namespace that get_wds_dataset reads."""
    return argparse.Namespace(
        train_data=brace_pattern(folder),
        val_data=None,
        dataset_resampled=False,
        train_num_samples=None,  # so that get_dataset_size reads sizes.json
        train_data_upsampling_factors=None,
        seed=0,
        workers=workers,
        world_size=1,
        batch_size=4,
    )


def open_clip_loader(folder: Path, workers: int) -> Any:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    info = get_wds_dataset(
        open_clip_args(folder, workers), pil_to_tensor, is_train=True, tokenizer=tokenizer
    )
    return info, tokenizer


def test_open_clip_3_3_crashes_at_the_end_of_shard_marker(
    written: tuple[Path, str], unpatched: None
) -> None:
    """open_clip #935. When this test fails, open_clip handles webdataset's ``{}`` itself and
    :mod:`upstream.openclip_compat` can go."""
    folder, _ = written
    info, _ = open_clip_loader(folder, workers=0)
    with pytest.raises(KeyError, match="fname"):
        for _ in info.dataloader:
            pass


@pytest.mark.parametrize("workers", [0, 2])
def test_open_clip_reads_every_sample_once_with_the_patch(
    written: tuple[Path, str], unpatched: None, workers: int
) -> None:
    folder, _ = written
    assert openclip_compat.patch_open_clip() is True
    assert openclip_compat.patch_open_clip() is False  # idempotent
    info, tokenizer = open_clip_loader(folder, workers=workers)
    # sizes.json was read: 24 samples, 6 batches of 4.
    assert info.dataloader.num_samples == N and info.dataloader.num_batches == N // 4
    images, labels, captions = loader.load_split(str(folder))
    caption_of = {pixels_id(x): c for x, c in zip(images, captions, strict=True)}
    seen: list[str] = []
    for batch_images, batch_tokens in info.dataloader:
        assert batch_images.shape == (4, 3, 16, 16) and batch_tokens.shape == (4, 77)
        for x, tokens in zip(batch_images, batch_tokens, strict=True):
            key = pixels_id(x)
            seen.append(key)
            assert torch.equal(tokens, tokenizer([caption_of[key]])[0])
    assert sorted(seen) == sorted(pixels_id(x) for x in images)  # every sample exactly once
    assert len(seen) == N


def test_unpatch_restores_open_clip(unpatched: None) -> None:
    from open_clip_train import data

    original = data.tarfile_to_samples_nothrow
    openclip_compat.patch_open_clip()
    assert data.tarfile_to_samples_nothrow is openclip_compat.tarfile_to_samples_nothrow
    openclip_compat.unpatch_open_clip()
    assert data.tarfile_to_samples_nothrow is original


def test_open_clip_trainer_trains_on_upstream_shards(tmp_path: Path) -> None:
    """open_clip's own training script, end to end, on shards the shard stage wrote."""
    import os
    import subprocess
    import sys

    from upstream.shards.stage import ShardConfig, shard

    out = tmp_path / "shards"
    shard(ShardConfig.parse(source="shapes", samples_per_class=16, image_format="jpg",
                            min_shards=2, output=str(out)))
    result = subprocess.run(
        [sys.executable, "-m", "upstream.openclip_compat",
         "--train-data", f"{out}/shard-{{000000..000001}}.tar", "--dataset-type", "webdataset",
         "--model", "upstream-tiny-rn", "--epochs", "1", "--batch-size", "16", "--workers", "0",
         "--device", "cpu", "--logs", str(tmp_path / "logs"), "--report-to", ""],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log = next((tmp_path / "logs").glob("*/out.log")).read_text()
    # 8 shapes × 16 samples, counted from sizes.json, all seen in the one epoch
    assert "[128/128 (100%)]" in log, log[-2000:]
    assert list((tmp_path / "logs").glob("*/checkpoints/epoch_1.pt"))
