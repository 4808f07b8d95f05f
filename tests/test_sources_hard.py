"""``clutter``: a downstream set that pixels do not separate but learned features do.

``digits`` is nearly linearly separable in pixels, so a linear probe on a random tower matches
every pre-trained one. ``clutter`` must not be: a logistic regression on raw pixels stays near
chance, while a small CNN trained from scratch for a few seconds learns the classes. Measured
on a 2-core machine (2026-12-01, 10 classes, 32 px, 100 test images per class): pixel logistic
regression 0.09–0.11 for C from 1e-4 to 1 (100 train images per class; ``digits`` 0.94);
the CNN below 0.526 after 15 epochs on 300 per class (24–32 s on one thread).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from upstream.data import open_source
from upstream.data.clutter import NAMES, ClutterSource
from upstream.data.sources import parse_sources
from upstream.errors import UpstreamError

CLASSES = 10
#: Far above chance (0.1) would mean pixel statistics give the class away.
PIXEL_LR_AT_MOST = 0.2
#: The CNN must be both clearly above chance and clearly above pixel LR.
CNN_AT_LEAST = 0.35
CNN_MARGIN = 0.2


def arrays(split: str, per_class: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    src = open_source("clutter", split, samples_per_class=per_class, image_size=32, seed=seed)
    images = np.stack([np.asarray(src.image(i)) for i in range(len(src))])
    return images, np.asarray(src.labels)


@pytest.fixture(scope="module")
def data() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {"train": arrays("train", 300), "test": arrays("test", 100)}


@pytest.fixture(scope="module")
def pixel_lr(data: dict[str, tuple[np.ndarray, np.ndarray]]) -> float:
    return pixel_lr_accuracy(data, per_class=100)


def pixel_lr_accuracy(data: dict[str, tuple[np.ndarray, np.ndarray]], per_class: int) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x, y = data["train"]
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(CLASSES)])
    flat = x[keep].reshape(len(keep), -1).astype(np.float32)
    scaler = StandardScaler().fit(flat)
    lr = LogisticRegression(C=1e-3, max_iter=200).fit(scaler.transform(flat), y[keep])
    xt, yt = data["test"]
    return float(lr.score(scaler.transform(xt.reshape(len(xt), -1).astype(np.float32)), yt))


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 24), nn.MaxPool2d(2),
        *block(24, 48), nn.MaxPool2d(2),
        *block(48, 96), nn.MaxPool2d(2),
        *block(96, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, CLASSES),
    )  # fmt: skip


def cnn_accuracy(
    data: dict[str, tuple[np.ndarray, np.ndarray]], epochs: int, batch: int = 64
) -> float:
    threads = torch.get_num_threads()
    # One thread: the same result on any machine (no reduction order that depends on the
    # core count), and no threads spinning against whatever else runs on a small CI box.
    torch.set_num_threads(1)
    try:
        return _train_and_score(data, epochs, batch)
    finally:
        torch.set_num_threads(threads)


def _train_and_score(
    data: dict[str, tuple[np.ndarray, np.ndarray]], epochs: int, batch: int
) -> float:
    def tensor(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    model = small_cnn()
    x, y = tensor(data["train"][0]), torch.from_numpy(data["train"][1])
    steps = epochs * (len(x) // batch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(len(x) // batch):
            idx = order[b * batch : (b + 1) * batch]
            xb = x[idx]
            # Mirroring is one of the source's nuisances, so it is a fair augmentation.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    xt, yt = data["test"]
    with torch.no_grad():
        pred = model(tensor(xt)).argmax(1).numpy()
    return float((pred == yt).mean())


def test_pixels_do_not_separate_the_classes(pixel_lr: float) -> None:
    print(f"pixel logistic regression, 100/class: {pixel_lr:.3f}")
    assert pixel_lr <= PIXEL_LR_AT_MOST


def test_a_small_cnn_learns_the_classes(
    data: dict[str, tuple[np.ndarray, np.ndarray]], pixel_lr: float
) -> None:
    cnn = cnn_accuracy(data, epochs=15)
    print(f"small CNN from scratch, 300/class: {cnn:.3f} (pixel LR {pixel_lr:.3f})")
    assert cnn >= CNN_AT_LEAST
    assert cnn >= pixel_lr + CNN_MARGIN


def test_same_seed_same_images_and_the_splits_differ() -> None:
    a = open_source("clutter", "train", samples_per_class=3)
    b = open_source("clutter", "train", samples_per_class=3)
    test = open_source("clutter", "test", samples_per_class=3)
    other_seed = open_source("clutter", "train", samples_per_class=3, seed=1)
    assert len(a) == 3 * CLASSES and a.class_names == list(NAMES)
    assert a.labels == test.labels == [c for c in range(CLASSES) for _ in range(3)]
    for i in range(len(a)):
        img = a.image(i)
        assert img.size == (32, 32) and img.mode == "RGB"
        assert img.tobytes() == b.image(i).tobytes()
        assert img.tobytes() != test.image(i).tobytes()
        assert img.tobytes() != other_seed.image(i).tobytes()
    # No test image is a train image (compared across all pairs, not only the same index).
    train_bytes = {a.image(i).tobytes() for i in range(len(a))}
    assert train_bytes.isdisjoint(test.image(i).tobytes() for i in range(len(test)))
    assert len(train_bytes) == len(a)


def test_options_sizes_and_registration() -> None:
    assert [s.kind for s in parse_sources("clutter+shapes")] == ["clutter", "shapes"]
    src = open_source("clutter", "test", num_classes=4, samples_per_class=2, image_size=64)
    assert isinstance(src, ClutterSource) and src.generated
    assert src.class_names == list(NAMES[:4]) and len(src) == 8
    assert src.image(7).size == (64, 64)
    assert src.sample(3)[2] | {"index": 0} == {
        "source": "clutter", "split": "test", "index": 0, "class_name": NAMES[1], "instance": 1
    }  # fmt: skip
    with pytest.raises(UpstreamError, match="clutter has 10 classes"):
        open_source("clutter", "train", num_classes=11)
    with pytest.raises(UpstreamError, match="takes no argument"):
        parse_sources("clutter:x")


@pytest.mark.usefixtures("tracking_home")
def test_shards_are_made_to_size(tmp_path: Path) -> None:
    from upstream.shards.stage import ShardConfig, shard

    out = tmp_path / "c"
    m = shard(
        ShardConfig.parse(
            source="clutter", num_classes=3, samples_per_class=4, output=str(out), workers=1
        )
    )
    assert m["class_counts"] == dict.fromkeys(NAMES[:3], 4)
    assert m["caption_template"] == "a picture of a {label} among clutter."
