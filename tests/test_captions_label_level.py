"""Captions follow the label level, and a mixture's manifest names every source's template.

With ``label_level=coarse`` the captions must name the superclass: if they named the fine
class, CLIP pre-training on coarse labels would see the same text as on fine labels and
train the same model.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from upstream.shards import loader
from upstream.shards.stage import ShardConfig, data_fingerprint, shard

pytestmark = pytest.mark.usefixtures("tracking_home")

FRACTALS = [f"fractal-{i:02d}" for i in range(4)]
#: Two superclasses of two fractal categories each.
GROUPS = {name: ("spiral" if i < 2 else "fern") for i, name in enumerate(FRACTALS)}


@pytest.fixture(scope="module")
def groups_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hier") / "fractal-groups.json"
    path.write_text(json.dumps(GROUPS))
    return path


def run(out: Path, **kw: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "source": "fractals",
        "num_classes": len(FRACTALS),
        "samples_per_class": 3,
        "image_size": 16,
        "shard_size": 100,
        "workers": 1,
    } | kw
    return shard(ShardConfig.parse(output=str(out), **values))


def captions(out: Path) -> dict[str, tuple[str, str]]:
    """``key → (caption, class name of its label)`` of every sample in the shards."""
    manifest = loader.read_manifest(str(out))
    texts: dict[str, str] = {}
    labels: dict[str, int] = {}
    for tar_path in sorted(out.glob("shard-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                f = tar.extractfile(member)
                assert f is not None
                if ext == "txt":
                    texts[key] = f.read().decode()
                elif ext == "cls":
                    labels[key] = int(f.read())
    assert texts.keys() == labels.keys() and texts
    return {k: (texts[k], manifest["class_names"][labels[k]]) for k in texts}


def test_coarse_captions_name_the_superclass(tmp_path: Path, groups_file: Path) -> None:
    fine = run(tmp_path / "fine")
    coarse = run(tmp_path / "coarse", hierarchy=str(groups_file), label_level="coarse")
    assert coarse["class_names"] == ["fern", "spiral"]
    template = fine["caption_template"]
    assert coarse["caption_template"] == template == "an image of the fractal {label}."

    fine_caps = captions(tmp_path / "fine")
    coarse_caps = captions(tmp_path / "coarse")
    # Every caption names the class its label says, at either level.
    assert all(text == template.replace("{label}", name) for text, name in fine_caps.values())
    assert all(text == template.replace("{label}", name) for text, name in coarse_caps.values())
    assert {t for t, _ in coarse_caps.values()} == {
        "an image of the fractal fern.",
        "an image of the fractal spiral.",
    }
    assert not any(n in t for t, _ in coarse_caps.values() for n in FRACTALS)
    assert {t for t, _ in fine_caps.values()}.isdisjoint(t for t, _ in coarse_caps.values())


def test_caption_filters_read_the_coarse_caption(tmp_path: Path, groups_file: Path) -> None:
    m = run(
        tmp_path / "f",
        hierarchy=str(groups_file),
        label_level="coarse",
        caption_require="fern",
    )
    assert m["class_counts"] == {"fern": 6, "spiral": 0}
    assert {t for t, _ in captions(tmp_path / "f").values()} == {"an image of the fractal fern."}


def test_clip_templates_name_the_superclass(tmp_path: Path, groups_file: Path) -> None:
    run(
        tmp_path / "clip",
        hierarchy=str(groups_file),
        label_level="coarse",
        caption_template="clip",
    )
    for text, name in captions(tmp_path / "clip").values():
        assert name in text and not any(n in text for n in FRACTALS)


def test_coarse_and_fine_sets_have_different_fingerprints(groups_file: Path) -> None:
    # A coarse set written before captions followed the level must not be taken as current.
    fine = ShardConfig.parse(source="fractals", output="x")
    coarse = ShardConfig.parse(
        source="fractals", output="x", hierarchy=str(groups_file), label_level="coarse"
    )
    assert data_fingerprint(fine) != data_fingerprint(coarse)


def test_mixture_manifest_records_every_template(tmp_path: Path) -> None:
    m = run(tmp_path / "mix", source="fractals+shapes", num_classes=2)
    assert m["caption_templates"] == ["an image of the fractal {label}.", "a drawing of a {label}."]
    assert m["caption_template"] == {
        "fractals": "an image of the fractal {label}.",
        "shapes": "a drawing of a {label}.",
    }
    texts = {t for t, _ in captions(tmp_path / "mix").values()}
    assert texts == {
        "an image of the fractal fractal-00.",
        "an image of the fractal fractal-01.",
        "a drawing of a circle.",
        "a drawing of a square.",
    }


def test_one_template_for_every_source_is_recorded_once(tmp_path: Path) -> None:
    m = run(tmp_path / "same", source="fractals+shapes", num_classes=2, caption_template="{label}")
    assert m["caption_template"] == "{label}"
    assert m["caption_templates"] == ["{label}", "{label}"]
