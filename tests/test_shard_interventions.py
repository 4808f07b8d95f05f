"""Every intervention through the shard stage: the manifest's class counts, exactly.

``tests/test_interventions.py`` checks the plan on in-memory sources; here the same
interventions run end to end (source → plan → encoded shards → manifest), so the counts are
what a training run will read, and a bad value fails before any shard is written.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from upstream.errors import UpstreamError
from upstream.shards import loader
from upstream.shards.stage import ShardConfig, shard

pytestmark = pytest.mark.usefixtures("tracking_home")

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PARITY = {name: ("even" if i % 2 == 0 else "odd") for i, name in enumerate(DIGITS)}


def run(out: Path, **kw: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"source": "digits", "image_size": 8, "shard_size": 64} | kw
    return shard(ShardConfig.parse(output=str(out), **values))


def read_back(out: Path) -> Counter[str]:
    """Class counts of what the shards really hold (not what the manifest claims)."""
    manifest = loader.read_manifest(str(out))
    _, labels, _ = loader.load_split(str(out))
    return Counter(manifest["class_names"][i] for i in labels.tolist())


@pytest.fixture(scope="module")
def parity_map(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hier") / "parity.json"
    path.write_text(json.dumps(PARITY))
    return path


def test_num_samples_is_class_balanced(tmp_path: Path) -> None:
    m = run(tmp_path / "a", num_samples=53)
    # 5 each, and the 3 left over go to the first classes in label order
    assert m["class_counts"] == {n: 6 if i < 3 else 5 for i, n in enumerate(DIGITS)}
    assert read_back(tmp_path / "a") == Counter(m["class_counts"])
    assert m["interventions"]["steps"] == [
        {"step": "num_samples", "num_samples": 53, "in": 1437, "out": 53}
    ]


@pytest.mark.parametrize("num_classes, per_class", [(3, 10), (6, 5)])
def test_diversity_at_fixed_size(tmp_path: Path, num_classes: int, per_class: int) -> None:
    # Ramanujan et al.: the same N spread over fewer classes, more images each.
    m = run(tmp_path / "d", num_samples=30, num_classes=num_classes)
    assert m["class_counts"] == dict.fromkeys(DIGITS[:num_classes], per_class)
    assert m["num_samples"] == 30


def test_classes_by_name_and_by_group(tmp_path: Path, parity_map: Path) -> None:
    m = run(tmp_path / "n", classes="one,seven", samples_per_class=7)
    assert m["class_counts"] == {"one": 7, "seven": 7}
    assert read_back(tmp_path / "n") == Counter({"one": 7, "seven": 7})
    m = run(tmp_path / "g", classes="group:odd", hierarchy=str(parity_map), samples_per_class=4)
    assert m["class_counts"] == dict.fromkeys(["one", "three", "five", "seven", "nine"], 4)


def test_coarse_labels_through_a_hierarchy(tmp_path: Path, parity_map: Path) -> None:
    m = run(tmp_path / "c", hierarchy=str(parity_map), label_level="coarse", num_samples=40)
    assert m["class_names"] == ["even", "odd"]
    assert m["class_counts"] == {"even": 20, "odd": 20}
    assert read_back(tmp_path / "c") == Counter({"even": 20, "odd": 20})


def test_mixture_with_proportions(tmp_path: Path) -> None:
    m = run(tmp_path / "m", source="digits+shapes", proportions="0.5,0.5", num_samples=40,
            image_size=16)
    counts = m["class_counts"]
    assert {counts[n] for n in DIGITS} == {2}  # 20 digits over 10 classes
    shapes = {k: v for k, v in counts.items() if k not in DIGITS}
    assert len(shapes) == 8 and sum(shapes.values()) == 20
    assert sorted(shapes.values()) == [2, 2, 2, 2, 3, 3, 3, 3]
    assert m["interventions"]["source_counts"] == [20, 20]


def _folder_with_duplicates(root: Path) -> None:
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            base = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
            # blocky, so that its pHash is stable under a small brightness change
            base = np.kron(base[::4, ::4], np.ones((4, 4, 1), dtype=np.uint8))
            Image.fromarray(base).save(root / c / f"{i}.png")
        # an exact copy of image 0 and a slightly brightened copy of image 1
        (root / c / "0copy.png").write_bytes((root / c / "0.png").read_bytes())
        near = np.asarray(Image.open(root / c / "1.png"), dtype=np.int16) + 6
        Image.fromarray(near.clip(0, 255).astype(np.uint8)).save(root / c / "1near.png")


def test_exact_and_near_dedup(tmp_path: Path) -> None:
    _folder_with_duplicates(tmp_path / "src")
    source = f"imagefolder:{tmp_path / 'src'}"
    none = run(tmp_path / "0", source=source, image_size=24)
    exact = run(tmp_path / "1", source=source, image_size=24, dedup="exact")
    near = run(tmp_path / "2", source=source, image_size=24, dedup="near")
    assert none["class_counts"] == {"a": 8, "b": 8}
    assert exact["class_counts"] == {"a": 7, "b": 7}
    assert near["class_counts"] == {"a": 6, "b": 6}
    step = next(s for s in near["interventions"]["steps"] if s["step"] == "dedup")
    assert step["removed"] == 4


def test_caption_filters_on_a_caption_table(tmp_path: Path) -> None:
    rows = []
    for i in range(12):
        Image.new("RGB", (10, 10), (i * 20, 0, 0)).save(tmp_path / f"{i}.png")
        label = ("cat", "dog")[i % 2]
        place = ("snow", "park", "beach")[i % 3]
        rows.append({"image": f"{i}.png", "caption": f"A {label} on the {place}", "label": label})
    with open(tmp_path / "t.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption", "label"])
        writer.writeheader()
        writer.writerows(rows)
    m = run(tmp_path / "f", source=f"captions:{tmp_path / 't.csv'}", caption_exclude="SNOW",
            image_size=10)
    assert m["class_counts"] == {"cat": 4, "dog": 4}
    _, _, captions = loader.load_split(str(tmp_path / "f"))
    assert not any("snow" in c for c in captions) and len(captions) == 8
    m = run(tmp_path / "r", source=f"captions:{tmp_path / 't.csv'}", caption_require="beach",
            image_size=10)
    assert m["class_counts"] == {"cat": 2, "dog": 2}


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"num_samples": 5000}, "num_samples=5000"),
        ({"classes": "eleven"}, "eleven"),
        ({"label_level": "coarse", "hierarchy": "{parity}"}, "unmapped"),
        ({"source": "digits+shapes", "proportions": "0.5,0.6"}, "sum to 1"),
    ],
)
def test_bad_values_fail_before_any_shard(tmp_path: Path, parity_map: Path, kw: dict[str, Any],
                                          needle: str) -> None:
    partial = {k: v.format(parity=parity_map) for k, v in kw.items() if isinstance(v, str)}
    kw = kw | partial
    if kw.get("label_level") == "coarse":  # a map that leaves "nine" out
        short = tmp_path / "short.json"
        short.write_text(json.dumps({k: v for k, v in PARITY.items() if k != "nine"}))
        kw["hierarchy"] = str(short)
    out = tmp_path / "out"
    with pytest.raises(UpstreamError, match=needle) as info:
        run(out, **kw)
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_interventions_from_the_command_line(tmp_path: Path, parity_map: Path) -> None:
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "upstream", "shard", "--source", "digits", "--hierarchy",
         str(parity_map), "--label-level", "coarse", "--num-samples", "30", "--image-size", "8",
         "--min-shards", "3", "--kshot", "2", "--kshot-trials", "2", "--output", str(out)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["class_counts"] == {"even": 15, "odd": 15}
    assert len(manifest["shards"]) == 3
    assert json.loads((out / "sizes.json").read_text()) == {
        s["name"]: s["num_samples"] for s in manifest["shards"]
    }
    for seed in (0, 1):
        stored = json.loads((out / "kshot" / f"k2-seed{seed}.json").read_text())
        assert len(stored["indices"]) == 4
