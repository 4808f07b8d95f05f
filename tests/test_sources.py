"""Sources (digits, fractals, shapes, imagefolder, torchvision) and corruptions."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from upstream.data import corrupt, fit, open_source, parse_source
from upstream.data.corruptions import KINDS
from upstream.data.fractals import category_maps
from upstream.data.shapes import SHAPES
from upstream.errors import UpstreamError
from upstream.shards.stage import ShardConfig


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# --- source strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "arg"),
    [
        ("digits", "digits", ""),
        ("imagefolder:/data/x", "imagefolder", "/data/x"),
        ("torchvision:CIFAR10", "torchvision", "CIFAR10"),
    ],
)
def test_parse_source_accepts(text: str, kind: str, arg: str) -> None:
    spec = parse_source(text)
    assert (spec.kind, spec.arg) == (kind, arg)
    assert str(spec) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("mnist", "unknown source"),
        ("imagefolder", "needs a DIR"),
        ("torchvision:", "needs a NAME"),
        ("digits:extra", "takes no argument"),
    ],
)
def test_parse_source_rejects(text: str, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        parse_source(text)


def test_config_rejects_bad_source_naming_the_field() -> None:
    with pytest.raises(UpstreamError, match=r"shard: invalid source: .*unknown source"):
        ShardConfig.parse(source="cifar")


# --- digits ------------------------------------------------------------------------------------


def test_digits_splits_are_stratified_disjoint_and_fixed() -> None:
    train = open_source("digits", "train")
    test = open_source("digits", "test", seed=123)  # the config seed must not move the split
    assert (len(train), len(test)) == (1437, 360)
    assert train.class_names[3] == "three" and len(train.class_names) == 10
    train_ids = {train.sample(i)[2]["sklearn_index"] for i in range(len(train))}
    test_ids = {test.sample(i)[2]["sklearn_index"] for i in range(len(test))}
    assert not train_ids & test_ids
    assert len(train_ids | test_ids) == 1797
    per_class = Counter(test.labels)
    assert min(per_class.values()) >= 35 and max(per_class.values()) <= 37
    img, label, meta = test.sample(0)
    assert img.mode == "RGB" and img.size == (8, 8)
    assert meta["class_name"] == test.class_names[label] and meta["split"] == "test"


def test_digits_subset_is_seeded_and_exact() -> None:
    a = open_source("digits", "train", num_classes=3, samples_per_class=7, seed=1)
    b = open_source("digits", "train", num_classes=3, samples_per_class=7, seed=1)
    c = open_source("digits", "train", num_classes=3, samples_per_class=7, seed=2)
    assert a.class_names == ["zero", "one", "two"]
    assert Counter(a.labels) == {0: 7, 1: 7, 2: 7}
    ids = [a.sample(i)[2]["sklearn_index"] for i in range(len(a))]
    assert ids == [b.sample(i)[2]["sklearn_index"] for i in range(len(b))]
    assert ids != [c.sample(i)[2]["sklearn_index"] for i in range(len(c))]
    # More per class than there are keeps them all ("at most").
    assert len(open_source("digits", "test", samples_per_class=1000)) == 360


def test_digits_too_many_classes() -> None:
    with pytest.raises(UpstreamError, match="digits has 10 classes; num_classes=11"):
        open_source("digits", "train", num_classes=11)


# --- fractals ----------------------------------------------------------------------------------


def test_fractals_counts_sizes_and_determinism() -> None:
    src = open_source("fractals", "train", num_classes=3, samples_per_class=4, image_size=40)
    assert src.class_names == ["fractal-00", "fractal-01", "fractal-02"]
    assert Counter(src.labels) == {0: 4, 1: 4, 2: 4}
    again = open_source("fractals", "train", num_classes=3, samples_per_class=4, image_size=40)
    img = src.image(5)
    assert img.size == (40, 40) and img.mode == "RGB"
    assert img.tobytes() == again.image(5).tobytes()
    # Not blank: a fractal covers a fair share of the picture in more than one colour.
    arr = pixels(img)
    assert len(np.unique(arr.reshape(-1, 3), axis=0)) > 2


def test_fractals_default_size_and_split_independence() -> None:
    assert len(open_source("fractals", "train")) == 10 * 100
    train = open_source("fractals", "train", num_classes=2, samples_per_class=3, image_size=32)
    test = open_source("fractals", "test", num_classes=2, samples_per_class=3, image_size=32)
    other_seed = open_source(
        "fractals", "train", num_classes=2, samples_per_class=3, image_size=32, seed=9
    )
    assert train.image(0).tobytes() != test.image(0).tobytes()
    assert train.image(0).tobytes() != other_seed.image(0).tobytes()
    # Categories are fixed by their index alone, and differ from each other.
    assert np.array_equal(category_maps(1), category_maps(1))
    assert category_maps(0).shape != category_maps(1).shape or not np.allclose(
        category_maps(0), category_maps(1)
    )


def test_fractals_render_fast() -> None:
    src = open_source("fractals", "train", num_classes=2, samples_per_class=10, image_size=64)
    src.image(0)  # category search, once
    start = time.perf_counter()
    for i in range(len(src)):
        src.image(i)
    assert (time.perf_counter() - start) / len(src) < 0.05


# --- shapes ------------------------------------------------------------------------------------


def test_shapes_counts_sizes_and_determinism() -> None:
    src = open_source("shapes", "train", samples_per_class=2, image_size=24)
    assert src.class_names == list(SHAPES)
    assert Counter(src.labels) == dict.fromkeys(range(len(SHAPES)), 2)
    img, label, meta = src.sample(3)
    assert img.size == (24, 24) and label == 1 and meta["class_name"] == "square"
    assert meta["instance"] == 1
    same = open_source("shapes", "train", samples_per_class=2, image_size=24)
    assert img.tobytes() == same.image(3).tobytes()
    assert (
        img.tobytes()
        != open_source("shapes", "test", samples_per_class=2, image_size=24).image(3).tobytes()
    )
    # A shape is drawn: two clearly different colours.
    arr = pixels(img).reshape(-1, 3)
    assert np.abs(arr.max(axis=0) - arr.min(axis=0)).sum() > 100


def test_shapes_too_many_classes() -> None:
    with pytest.raises(UpstreamError, match=f"shapes has {len(SHAPES)} classes"):
        open_source("shapes", "train", num_classes=len(SHAPES) + 1)


# --- imagefolder -------------------------------------------------------------------------------


def make_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (10, 6)) -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            path = root / name / ("nested" if i % 2 else "") / f"img{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, (40 * c, 10 * i, 200)).save(path)
    return root


def test_imagefolder_classes_and_files(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"cat": 3, "ant": 2})
    (root / "cat" / "notes.txt").write_text("not an image")
    src = open_source(f"imagefolder:{root}", "train")
    assert src.class_names == ["ant", "cat"]
    assert Counter(src.labels) == {0: 2, 1: 3}
    img, label, meta = src.sample(0)
    assert img.mode == "RGB" and img.size == (10, 6) and label == 0
    assert meta["file"] == "ant/img0.png"
    assert src.sample(1)[2]["file"] == "ant/nested/img1.png"


def test_imagefolder_split_subfolders(tmp_path: Path) -> None:
    make_folder(tmp_path / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "test", {"a": 1, "b": 1})
    assert len(open_source(f"imagefolder:{tmp_path}", "train")) == 4
    assert len(open_source(f"imagefolder:{tmp_path}", "test")) == 2
    only_train = tmp_path / "only"
    make_folder(only_train / "train", {"a": 1})
    with pytest.raises(UpstreamError, match="has a train/ folder but no test/"):
        open_source(f"imagefolder:{only_train}", "test")


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "has no class sub-folders"),
        ("empty_class", "has no images"),
        ("file", "is not a folder"),
    ],
)
def test_imagefolder_bad_input(tmp_path: Path, layout: str, message: str) -> None:
    root = tmp_path / "data"
    if layout == "empty":
        root.mkdir()
    elif layout == "empty_class":
        make_folder(root, {"a": 1})
        (root / "b").mkdir()
    elif layout == "file":
        root.write_text("x")
    with pytest.raises(UpstreamError, match=message):
        open_source(f"imagefolder:{root}", "train")


def test_imagefolder_unreadable_image_is_named(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 1})
    (root / "a" / "img0.png").write_bytes(b"not a png")
    src = open_source(f"imagefolder:{root}", "train")
    with pytest.raises(UpstreamError, match=r"cannot read image .*img0\.png"):
        src.image(0)


def test_imagefolder_too_many_classes(tmp_path: Path) -> None:
    root = make_folder(tmp_path / "data", {"a": 1, "b": 1})
    with pytest.raises(UpstreamError, match="has 2 classes; num_classes=3"):
        open_source(f"imagefolder:{root}", "train", num_classes=3)


# --- torchvision -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NoSuchSet", "unknown torchvision dataset 'NoSuchSet'"),
        ("utils", "unknown torchvision dataset 'utils'"),
        ("FakeData", "has no train/test split"),
    ],
)
def test_torchvision_bad_names_fail_fast(
    tmp_path: Path, name: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_HOME", str(tmp_path))
    with pytest.raises(UpstreamError, match=message):
        open_source(f"torchvision:{name}", "train")
    assert not (tmp_path / "torchvision").exists()  # nothing downloaded, nothing created


def test_torchvision_wrapper_over_a_dataset_object() -> None:
    from torchvision.datasets import FakeData

    from upstream.data.tvdatasets import TorchvisionSource

    ds = FakeData(size=12, image_size=(3, 9, 7), num_classes=3, random_offset=5)
    src = TorchvisionSource(ds, "FakeData", "train")
    assert len(src) == 12
    assert src.labels == [int(ds[i][1]) for i in range(12)]
    assert src.class_names == [str(c) for c in range(max(src.labels) + 1)]
    img, label, meta = src.sample(4)
    assert img.mode == "RGB" and img.size == (7, 9)
    assert meta == {
        "source": "torchvision",
        "split": "train",
        "index": 4,
        "class_name": str(label),
        "dataset": "FakeData",
    }


# --- resize and corruptions --------------------------------------------------------------------


def test_fit_centre_crops_to_square() -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # a white band on the left, cropped away
    out = fit(img, 16)
    assert out.size == (16, 16)
    assert pixels(out).max() < 60
    small = fit(Image.new("L", (8, 8), 100), 32)
    assert small.size == (32, 32) and small.mode == "RGB"


def textured(size: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_corruptions_change_the_image_deterministically(kind: str) -> None:
    img = textured()
    out, used = corrupt(img, kind, 3, seed=0, index=7)
    assert used == kind and out.size == img.size and out.mode == "RGB"
    assert out.tobytes() != img.tobytes()
    assert out.tobytes() == corrupt(img, kind, 3, seed=0, index=7)[0].tobytes()


def test_corruption_severity_scales_strength() -> None:
    img = textured()
    contrast = [pixels(corrupt(img, "contrast", s, 0, 0)[0]).std() for s in range(1, 6)]
    assert all(a > b for a, b in zip(contrast, contrast[1:], strict=False))

    def roughness(x: Image.Image) -> float:
        return float(np.abs(np.diff(pixels(x), axis=1)).mean())

    blur = [roughness(corrupt(img, "blur", s, 0, 0)[0]) for s in range(1, 6)]
    assert all(a > b for a, b in zip(blur, blur[1:], strict=False))
    flat = Image.new("RGB", (32, 32), (128, 128, 128))
    noise = [pixels(corrupt(flat, "noise", s, 0, 0)[0]).std() for s in (1, 5)]
    assert noise[0] < noise[1]


def test_noise_depends_on_seed_and_index() -> None:
    flat = Image.new("RGB", (16, 16), (128, 128, 128))
    a = corrupt(flat, "noise", 2, seed=0, index=0)[0].tobytes()
    assert a != corrupt(flat, "noise", 2, seed=0, index=1)[0].tobytes()
    assert a != corrupt(flat, "noise", 2, seed=1, index=0)[0].tobytes()


def test_mixed_picks_a_kind_per_image() -> None:
    img = textured(16)
    used = [corrupt(img, "mixed", 2, seed=0, index=i)[1] for i in range(40)]
    assert set(used) == set(KINDS)
    assert used == [corrupt(img, "mixed", 2, seed=0, index=i)[1] for i in range(40)]
    out, kind = corrupt(img, "none", 5, seed=0, index=0)
    assert kind == "none" and out is img
    with pytest.raises(UpstreamError, match="unknown corruption 'fog2'"):
        corrupt(img, "fog2", 1, 0, 0)
