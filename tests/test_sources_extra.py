"""Sources of issue 3: caption tables, existing WebDataset tars, torchvision split table,
FractalDB at scale, and imagefolder's raw bytes."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from upstream import storage
from upstream.data import check_source, open_source, parse_source
from upstream.data.base import BadImage
from upstream.data.sources import parse_sources
from upstream.errors import UpstreamError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (20, 180, 180)]


def encode(colour: tuple[int, int, int], fmt: str = "PNG", size: tuple[int, int] = (9, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def mean_colour(img: Image.Image) -> tuple[int, ...]:
    return tuple(int(round(v)) for v in np.asarray(img, dtype=np.float64).mean(axis=(0, 1)))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 6) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


# --- source strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "arg"),
    [
        ("captions:/data/t.csv", "captions", "/data/t.csv"),
        (
            "wds:s3://bucket/laion/part-{00000..00009}.tar",
            "wds",
            "s3://bucket/laion/part-{00000..00009}.tar",
        ),
        ("wds:/data/shards", "wds", "/data/shards"),
    ],
)
def test_parse_new_kinds(text: str, kind: str, arg: str) -> None:
    spec = parse_source(text)
    assert (spec.kind, spec.arg, str(spec)) == (kind, arg, text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("captions", "needs a TABLE: captions:TABLE"),
        ("wds: ", "needs a SHARDS"),
        ("laion", r"unknown source 'laion': use one of .*captions:TABLE, wds:SHARDS"),
    ],
)
def test_parse_new_kinds_rejects(text: str, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        parse_source(text)


def test_mixture_of_new_kinds() -> None:
    specs = parse_sources("captions:/t.parquet + wds:/shards+fractals")
    assert [s.kind for s in specs] == ["captions", "wds", "fractals"]


# --- caption tables ----------------------------------------------------------------------------

ROWS = [  # file, caption, label, split
    ("img/a0.png", "a red square", "cat", "train"),
    ("img/a1.jpg", "a green thing", "dog", "train"),
    ("img/a2.png", "blue, with a comma", "ant", "test"),
    ("img/a3.jpg", "yellow", "dog", "train"),
    ("img/a4.png", "cyan", "cat", "val"),
]


def write_images(root: Path) -> None:
    for i, (name, *_rest) in enumerate(ROWS):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(COLOURS[i], "JPEG" if name.endswith(".jpg") else "PNG"))


def write_table(path: Path, columns: dict[str, list[Any]]) -> Path:
    df = pd.DataFrame(columns)
    if path.suffix == ".parquet":
        df.to_parquet(path)
    else:
        sep = "\t" if path.suffix == ".tsv" or path.name.endswith(".tab.csv") else ","
        df.to_csv(path, sep=sep, index=False)
    return path


@pytest.mark.parametrize(
    ("name", "image_col", "caption_col", "label_col"),
    [
        ("table.csv", "image", "caption", "label"),
        ("table.tsv", "filepath", "title", "class"),
        ("openclip.tab.csv", "filepath", "title", "label"),  # open_clip: tab-separated .csv
        ("table.parquet", "Path", "Text", "Label"),  # any case
    ],
)
def test_caption_table_formats(
    tmp_path: Path, name: str, image_col: str, caption_col: str, label_col: str
) -> None:
    write_images(tmp_path)
    table = write_table(
        tmp_path / name,
        {
            image_col: [r[0] for r in ROWS],
            caption_col: [r[1] for r in ROWS],
            label_col: [r[2] for r in ROWS],
            "split": [r[3] for r in ROWS],
        },
    )
    train = open_source(f"captions:{table}", "train")
    test = open_source(f"captions:{table}", "test")
    # Classes come from the whole table, so both splits agree even though "ant" is test-only.
    assert train.class_names == test.class_names == ["ant", "cat", "dog"]
    assert train.has_labels and train.kind == "captions"
    assert len(train) == 3 and len(test) == 1  # the "val" row is in neither
    assert train.labels == [1, 2, 2] and test.labels == [0]
    assert [train.caption(i) for i in range(3)] == ["a red square", "a green thing", "yellow"]
    assert test.caption(0) == "blue, with a comma"
    raw, ext = train.raw(1)
    assert raw == (tmp_path / "img/a1.jpg").read_bytes() and ext == "jpg"
    assert train.raw(0) == ((tmp_path / "img/a0.png").read_bytes(), "png")
    assert close(mean_colour(train.image(2)), COLOURS[3])
    img, label, meta = test.sample(0)
    assert label == 0 and meta["class_name"] == "ant"
    assert meta["file"] == "img/a2.png" and meta["row"] == 2
    assert close(mean_colour(img), COLOURS[2])


def test_caption_table_int_labels_absolute_paths_and_subset(tmp_path: Path) -> None:
    write_images(tmp_path / "elsewhere")
    (tmp_path / "tables").mkdir()
    table = write_table(
        tmp_path / "tables" / "t.parquet",
        {
            "file": [str(tmp_path / "elsewhere" / r[0]) for r in ROWS],
            "caption": [r[1] for r in ROWS],
            "label": [10, 2, 2, 10, 7],
        },
    )
    # no split column: every row is train; images outside the table's folder need the option
    src = open_source(f"captions:{table}", "train", allow_outside_paths=True)
    assert src.class_names == ["2", "7", "10"]  # numbers sort as numbers
    assert src.labels == [2, 0, 0, 2, 1]
    assert src.meta(0)["file"] == str(tmp_path / "elsewhere" / "img/a0.png")
    # A cut-down table still gives each row's own caption and file.
    sub = open_source(f"captions:{table}", "train", num_classes=1, allow_outside_paths=True)
    assert sub.class_names == ["2"] and len(sub) == 2
    assert [sub.caption(i) for i in range(2)] == ["a green thing", "blue, with a comma"]
    assert sub.raw(0) == ((tmp_path / "elsewhere/img/a1.jpg").read_bytes(), "jpg")


def test_caption_table_without_labels_or_split(tmp_path: Path) -> None:
    write_images(tmp_path)
    table = write_table(
        tmp_path / "t.csv", {"image": [r[0] for r in ROWS], "text": [r[1] for r in ROWS]}
    )
    src = open_source(f"captions:{table}", "train")
    assert not src.has_labels
    assert src.class_names == ["unlabeled"] and src.labels == [0] * 5
    assert src.caption(4) == "cyan"
    with pytest.raises(UpstreamError, match="has no split column, so all its rows are train"):
        open_source(f"captions:{table}", "test")


def test_caption_table_missing_column_fails_before_reading_images(tmp_path: Path) -> None:
    # No images exist at all: the column error must come first.
    table = write_table(tmp_path / "t.csv", {"url": ["x.png"], "title_text": ["a"], "label": ["a"]})
    with pytest.raises(UpstreamError) as e:
        open_source(f"captions:{table}", "train")
    msg = str(e.value)
    assert "\n" not in msg
    assert "no image column" in msg and "no caption column" in msg
    assert msg.endswith("its columns: url, title_text, label")
    only_caption_missing = write_table(tmp_path / "u.tsv", {"path": ["x.png"], "label": ["a"]})
    with pytest.raises(UpstreamError, match=r"has no caption column .*its columns: path, label$"):
        open_source(f"captions:{only_caption_missing}", "train")


def test_caption_table_missing_files_and_empty_split(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "img/a3.jpg").unlink()
    (tmp_path / "img/a0.png").unlink()
    table = write_table(
        tmp_path / "t.csv",
        {
            "image": [r[0] for r in ROWS],
            "caption": [r[1] for r in ROWS],
            "split": [r[3] for r in ROWS],
        },
    )
    with pytest.raises(
        UpstreamError, match=r"2 of 3 image files in .*t\.csv are missing, e\.g\. .*a0\.png \(row"
    ):
        open_source(f"captions:{table}", "train")
    assert len(open_source(f"captions:{table}", "test")) == 1  # its one file is there
    only_train = write_table(
        tmp_path / "v.csv", {"image": ["img/a1.jpg"], "caption": ["x"], "split": ["train"]}
    )
    with pytest.raises(UpstreamError, match="no rows with split=test .*holds: train"):
        open_source(f"captions:{only_train}", "test")


def test_caption_table_bad_image_and_urls(tmp_path: Path) -> None:
    write_images(tmp_path)
    (tmp_path / "img/a1.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    table = write_table(
        tmp_path / "t.csv", {"image": [r[0] for r in ROWS], "caption": [r[1] for r in ROWS]}
    )
    src = open_source(f"captions:{table}", "train")
    assert src.raw(1) == (b"\xff\xd8 not really a jpeg", "jpg")  # copying is no decode
    with pytest.raises(BadImage, match=r"cannot read image .*img/a1\.jpg"):
        src.image(1)
    urls = write_table(tmp_path / "u.csv", {"image": ["https://x/y.jpg"], "caption": ["c"]})
    with pytest.raises(UpstreamError, match="names a URL .*img2dataset"):
        open_source(f"captions:{urls}", "train")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.csv", "does not exist"),
        ("table.json", "not a table .*csv, .tsv or .parquet"),
        ("s3://b/t.csv", "must be a local file"),
    ],
)
def test_caption_table_checked_without_data(tmp_path: Path, name: str, message: str) -> None:
    (tmp_path / "table.json").write_text("{}")
    arg = name if name.startswith("s3://") else str(tmp_path / name)
    with pytest.raises(UpstreamError, match=message):
        check_source(parse_source(f"captions:{arg}"))


# --- WebDataset tars ---------------------------------------------------------------------------


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return path


def img2dataset_members(start: int, n: int) -> list[tuple[str, bytes]]:
    """What img2dataset writes: jpg + txt + json per sample, 9-digit keys."""
    out = []
    for i in range(start, start + n):
        key = f"{i:09d}"
        out += [
            (f"{key}.jpg", encode(COLOURS[i % 5], "JPEG")),
            (f"{key}.txt", f"caption number {i}".encode()),
            (f"{key}.json", json.dumps({"key": key, "url": f"http://x/{i}.jpg"}).encode()),
        ]
    return out


def test_wds_img2dataset_style_tars(tmp_path: Path) -> None:
    first = write_tar(tmp_path / "00000.tar", img2dataset_members(0, 3))
    write_tar(
        tmp_path / "00001.tar",
        [("__index__", b"ignored"), *img2dataset_members(3, 2), ("000000099.json", b"{}")],
    )  # meta member, no image
    (tmp_path / "notes.txt").write_text("not a shard")
    for arg in (str(tmp_path), f"{tmp_path}/{{00000..00001}}.tar"):
        src = open_source(f"wds:{arg}", "train")
        assert len(src) == 5 and not src.has_labels
        assert src.class_names == ["unlabeled"] and src.labels == [0] * 5
        assert [src.caption(i) for i in range(5)] == [f"caption number {i}" for i in range(5)]
        assert src.meta(3) == {"key": "000000003", "shard": "00001.tar"}
        assert src.raw(4) == (encode(COLOURS[4], "JPEG"), "jpg")
        assert close(mean_colour(src.image(2)), COLOURS[2])
    single = open_source(f"wds:{first}", "train")
    assert len(single) == 3 and single.sample(0)[2]["key"] == "000000000"
    with pytest.raises(UpstreamError, match="serves train only; put test shards in a test/"):
        open_source(f"wds:{tmp_path}", "test")


def test_wds_labels_from_cls_and_split_folders(tmp_path: Path) -> None:
    def members(labels: list[int]) -> list[tuple[str, bytes]]:
        out = []
        for i, c in enumerate(labels):
            out += [(f"s{i:03d}.png", encode(COLOURS[c % 5])), (f"s{i:03d}.cls", str(c).encode())]
        return out

    write_tar(tmp_path / "train" / "a.tar", members([7, 3, 7, 42]))
    write_tar(tmp_path / "test" / "a.tar", members([3]))
    train = open_source(f"wds:{tmp_path}", "train")
    test = open_source(f"wds:{tmp_path}", "test")
    # No manifest: the distinct cls values, sorted, named by their digits.
    assert train.class_names == ["3", "7", "42"] and train.labels == [1, 0, 1, 2]
    assert train.has_labels and train.caption(0) is None
    assert test.labels == [0] and len(test) == 1
    write_tar(tmp_path / "half" / "a.tar", members([1])[:2] + [("x.png", encode(COLOURS[0]))])
    assert not open_source(f"wds:{tmp_path / 'half'}", "train").has_labels
    write_tar(tmp_path / "only" / "train" / "a.tar", members([1]))
    with pytest.raises(UpstreamError, match="has a train/ folder of shards but no test/"):
        open_source(f"wds:{tmp_path / 'only'}", "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpstreamError, match="no .tar files in"):
        open_source(f"wds:{tmp_path / 'empty'}", "train")


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_header", "bad_header", "no_end"])
def test_wds_damaged_tar_names_shard_and_last_good_key(tmp_path: Path, damage: str) -> None:
    write_tar(tmp_path / "good.tar", img2dataset_members(0, 2))
    path = write_tar(tmp_path / "bad.tar", img2dataset_members(10, 4))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        infos = {m.name: m for m in tar.getmembers()}
    third = infos["000000012.jpg"]  # the image of the third sample
    if damage == "truncated_data":
        data = data[: third.offset_data + third.size // 2]
    elif damage == "truncated_header":
        data = data[: third.offset + 100]
    elif damage == "bad_header":
        data = data[: third.offset] + b"\x07" * 512 + data[third.offset + 512 :]
    else:  # cut exactly after the last member: no end-of-archive block
        last = infos["000000013.json"]
        data = data[: last.offset_data + -(-last.size // 512) * 512]
    path.write_bytes(data)
    # The third sample (12) is cut short or never starts; cut after the last member, all four
    # samples are whole but the tar has no end.
    expected = "000000013" if damage == "no_end" else "000000011"
    with pytest.raises(UpstreamError) as e:
        open_source(f"wds:{tmp_path}", "train")
    assert f"shard bad.tar is truncated or corrupt after sample {expected}" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def upstream_shards(
    tracking_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    from upstream.shards.stage import ShardConfig, shard

    out = tmp_path_factory.mktemp("shards") / "set"
    manifest = shard(
        ShardConfig.parse(source="shapes", samples_per_class=2, shard_size=5, output=str(out))
    )
    return out, manifest


def read_with_webdataset(urls: list[str]) -> dict[str, dict[str, Any]]:
    import webdataset as wds

    samples = {}
    for s in wds.WebDataset(urls, shardshuffle=False):
        if "__key__" in s:  # webdataset ≥ 0.2.90 yields an empty {} at each shard's end
            samples[s["__key__"]] = s
    return samples


def test_wds_reads_upstreams_own_shards(upstream_shards: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = upstream_shards
    src = open_source(f"wds:{out}", "train")
    assert len(src) == manifest["num_samples"] == 16
    assert src.class_names == manifest["class_names"] and src.has_labels
    assert Counter(src.labels) == {i: 2 for i in range(8)}
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    truth = read_with_webdataset(urls)
    image_key = next(k for k in ("png", "jpg", "webp") if k in next(iter(truth.values())))
    for i in range(len(src)):
        sample = truth[src.meta(i)["key"]]
        assert src.labels[i] == int(sample["cls"])
        assert src.caption(i) == sample["txt"].decode()
        assert src.raw(i) == (sample[image_key], image_key)
    assert src.image(0).size == (manifest["image_size"], manifest["image_size"])
    # The manifest says which split the shards are.
    with pytest.raises(UpstreamError, match=r"are the train split \(manifest.json\), not test"):
        open_source(f"wds:{out}", "test")
    # Re-sharding a subset keeps the manifest's class names.
    sub = open_source(f"wds:{out}", "train", num_classes=3, samples_per_class=1)
    assert sub.class_names == manifest["class_names"][:3] and len(sub) == 3


def test_wds_from_s3(moto_s3: str, tmp_path: Path) -> None:
    local = tmp_path / "local"
    write_tar(
        local / "part-00000.tar",
        [
            (f"k{i}.{ext}", data)
            for i in range(3)
            for ext, data in (
                ("webp", encode(COLOURS[i], "WEBP")),
                ("cls", str(i % 2).encode()),
                ("txt", f"t{i}".encode()),
            )
        ],
    )
    write_tar(
        local / "part-00001.tar",
        [("k9.png", encode(COLOURS[4])), ("k9.cls", b"1"), ("k9.txt", b"t9")],
    )
    (local / "manifest.json").write_text(json.dumps({"class_names": ["even", "odd"]}))
    for p in local.iterdir():
        storage.upload_file(p, f"s3://{moto_s3}/sets/a/{p.name}")
    storage.upload_file(local / "part-00000.tar", f"s3://{moto_s3}/sets/a/nested/other.tar")
    check_source(parse_source(f"wds:s3://{moto_s3}/sets/a"))  # no network, no error
    for arg in (f"s3://{moto_s3}/sets/a/", f"s3://{moto_s3}/sets/a/part-{{00000..00001}}.tar"):
        src = open_source(f"wds:{arg}", "train")
        assert len(src) == 4  # the nested tar is not in the set
        assert src.class_names == ["even", "odd"] and src.labels == [0, 1, 0, 1]
        assert [src.caption(i) for i in range(4)] == ["t0", "t1", "t2", "t9"]
        assert src.raw(1) == (encode(COLOURS[1], "WEBP"), "webp")
        assert src.raw(3) == (encode(COLOURS[4]), "png")
        cache = src.paths[0].parent
        assert cache.is_dir()
        del src
        assert not cache.exists()  # the copies go with the source
    with pytest.raises(UpstreamError, match=r"part-00002\.tar does not exist"):
        open_source(f"wds:s3://{moto_s3}/sets/a/part-{{00000..00002}}.tar", "train")


@pytest.mark.parametrize(
    ("arg", "message"),
    [("nowhere", "does not exist"), ("x-{0..2}.tar", "3 of the 3 shards of .* do not exist")],
)
def test_wds_checked_without_data(tmp_path: Path, arg: str, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        check_source(parse_source(f"wds:{tmp_path / arg}"))


# --- torchvision split table (fakes stand in for the downloads this machine cannot make) -------


def fake_dataset(name: str, calls: list[dict[str, Any]], tmp: Path) -> type:
    """A stand-in for torchvision.datasets.NAME: records its kwargs, and, like the real class,
    keeps labels in the attribute that class uses, images as files where it uses files."""
    from torchvision.datasets import VisionDataset

    sizes = {"train": 4, "val": 2, "test": 3, "trainval": 5}

    class Fake(VisionDataset):
        def __init__(self, root: str, download: bool = False, **kwargs: Any) -> None:
            super().__init__(root)
            calls.append({"download": download, **kwargs})
            part = kwargs.get("split") or ("train" if kwargs.get("train") else "test")
            n = sizes[part]
            labels = [(i + len(part)) % 3 for i in range(n)]
            self.classes = ["c0", "c1", "c2"]
            self.part = part
            if name in ("CIFAR10", "CIFAR100"):
                self.targets = labels
            elif name == "STL10":
                self.labels = np.asarray(labels, dtype=np.uint8)
                self.data = np.zeros((n, 3, 4, 4), dtype=np.uint8)
            else:
                self._labels = labels
                files = []
                for i in range(n):
                    path = tmp / name / part / f"{i}.jpg"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(encode(COLOURS[i % 5], "JPEG"))
                    files.append(path)
                setattr(self, "_images" if name == "OxfordIIITPet" else "_image_files", files)

        def __len__(self) -> int:
            return len(
                self.targets
                if hasattr(self, "targets")
                else self.labels
                if hasattr(self, "labels")
                else self._labels
            )

        def __getitem__(self, i: int) -> tuple[Image.Image, int]:
            raise AssertionError("labels are read without decoding items")

    Fake.__name__ = name
    return Fake


@pytest.mark.parametrize(
    ("name", "train_calls", "test_calls", "sizes"),
    [
        ("CIFAR10", [{"train": True}], [{"train": False}], (4, 3)),
        ("CIFAR100", [{"train": True}], [{"train": False}], (4, 3)),
        (
            "DTD",
            [{"split": "train", "partition": 1}, {"split": "val", "partition": 1}],
            [{"split": "test", "partition": 1}],
            (6, 3),
        ),
        (
            "OxfordIIITPet",
            [{"split": "trainval", "target_types": "category"}],
            [{"split": "test", "target_types": "category"}],
            (5, 3),
        ),
        ("Flowers102", [{"split": "train"}, {"split": "val"}], [{"split": "test"}], (6, 3)),
        ("STL10", [{"split": "train"}], [{"split": "test"}], (4, 3)),
    ],
)
def test_torchvision_split_table(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    train_calls: list[dict[str, Any]],
    test_calls: list[dict[str, Any]],
    sizes: tuple[int, int],
) -> None:
    import torchvision.datasets as tvd

    monkeypatch.setenv("UPSTREAM_HOME", str(tmp_path / "home"))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(tvd, name, fake_dataset(name, calls, tmp_path))
    train = open_source(f"torchvision:{name}", "train")
    assert calls == [{"download": True, **c} for c in train_calls]
    calls.clear()
    test = open_source(f"torchvision:{name}", "test")
    assert calls == [{"download": True, **c} for c in test_calls]
    assert (len(train), len(test)) == sizes
    assert train.class_names == ["c0", "c1", "c2"]
    if name in ("DTD", "Flowers102"):  # train + val joined, in that order
        assert train.labels == [2, 0, 1, 2, 0, 1]
        assert train.raw(4) == ((tmp_path / name / "val" / "0.jpg").read_bytes(), "jpg")
        assert close(mean_colour(train.image(5)), COLOURS[1], tol=10)
    if name in ("CIFAR10", "STL10"):
        assert train.labels == [2, 0, 1, 2] and train.raw(0) is None


def test_torchvision_caltech101_fixed_per_class_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torchvision.datasets as tvd
    from torchvision.datasets import VisionDataset

    counts = {"accordion": 35, "airplanes": 31, "ant": 12}
    calls: list[dict[str, Any]] = []

    class Caltech101(VisionDataset):  # the real one's attributes: categories, index, y
        def __init__(self, root: str, download: bool = False, **kwargs: Any) -> None:
            super().__init__(str(Path(root) / "caltech101"))
            calls.append({"download": download, **kwargs})
            self.categories = sorted(counts)
            self.index, self.y = [], []
            for c, cat in enumerate(self.categories):
                folder = Path(self.root, "101_ObjectCategories", cat)
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(1, counts[cat] + 1):
                    path = folder / f"image_{i:04d}.jpg"
                    if not path.exists():
                        path.write_bytes(encode(COLOURS[c], "JPEG", size=(3 + i % 4, 5)))
                self.index.extend(range(1, counts[cat] + 1))
                self.y.extend([c] * counts[cat])

        def __len__(self) -> int:
            return len(self.y)

    monkeypatch.setenv("UPSTREAM_HOME", str(tmp_path))
    monkeypatch.setattr(tvd, "Caltech101", Caltech101)
    train = open_source("torchvision:Caltech101", "train")
    test = open_source("torchvision:Caltech101", "test", seed=99)  # the config seed: no effect
    assert calls == [{"download": True, "target_type": "category"}] * 2
    assert train.class_names == test.class_names == ["accordion", "airplanes", "ant"]
    assert Counter(train.labels) == {0: 30, 1: 30, 2: 11}
    assert Counter(test.labels) == {0: 5, 1: 1, 2: 1}
    train_files = {train.meta(i)["file"] + str(train.labels[i]) for i in range(len(train))}
    test_files = {test.meta(i)["file"] + str(test.labels[i]) for i in range(len(test))}
    assert not train_files & test_files and len(train_files | test_files) == 78
    again = open_source("torchvision:Caltech101", "train", seed=5)
    assert [again.meta(i) for i in range(len(again))] == [train.meta(i) for i in range(len(train))]
    raw, ext = test.raw(0)
    folder = tmp_path / "torchvision/Caltech101/caltech101/101_ObjectCategories/accordion"
    assert ext == "jpg" and raw == (folder / test.meta(0)["file"]).read_bytes()
    assert close(mean_colour(test.image(0)), COLOURS[0], tol=10)


def test_torchvision_unknown_name_lists_known_sets(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("UPSTREAM_HOME", str(tmp_path))
    with pytest.raises(UpstreamError, match=r"unknown torchvision dataset 'Pets'.*OxfordIIITPet"):
        check_source(parse_source("torchvision:Pets"))
    check_source(parse_source("torchvision:Caltech101"))  # no split argument, but in the table


# --- fractals at scale, imagefolder raw --------------------------------------------------------


def test_fractals_open_fast_at_1000_categories() -> None:
    start = time.perf_counter()
    src = open_source("fractals", "train", num_classes=1000, samples_per_class=2, image_size=24)
    assert time.perf_counter() - start < 0.5  # categories are searched lazily, not here
    assert len(src) == 2000 and len(src.class_names) == 1000
    assert src.class_names[0] == "fractal-000" and src.class_names[-1] == "fractal-999"
    assert Counter(src.labels)[999] == 2 and src.labels[1999] == 999
    start = time.perf_counter()
    images = [src.image(i).tobytes() for i in (0, 1, 1000, 1998, 1999)]
    assert time.perf_counter() - start < 2.0
    assert len(set(images)) == 5


def test_imagefolder_raw_and_bad_image(tmp_path: Path) -> None:
    for cls, fmt, ext in (("a", "PNG", "png"), ("b", "JPEG", "jpeg"), ("c", "BMP", "bmp")):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / f"x.{ext}").write_bytes(encode(COLOURS[0], fmt))
    (tmp_path / "c" / "y.png").write_bytes(b"broken")
    src = open_source(f"imagefolder:{tmp_path}", "train")
    assert src.raw(0) == ((tmp_path / "a/x.png").read_bytes(), "png")
    assert src.raw(1) == ((tmp_path / "b/x.jpeg").read_bytes(), "jpg")
    assert src.raw(2) is None  # bmp: decoded and re-encoded by the writer, not copied
    assert close(mean_colour(src.image(2)), COLOURS[0])
    with pytest.raises(BadImage, match=r"cannot read image .*c/y\.png"):
        src.image(3)
