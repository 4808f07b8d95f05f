"""Interventions (Ramanujan et al.): class selection, label granularity, caption filters,
de-duplication and size, planned over small in-memory sources with exact class counts."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from upstream.data.base import BadImage, Source
from upstream.data.dedup import (
    content_hash,
    exact_duplicate_pairs,
    near_duplicate_pairs,
    near_duplicates,
    phash,
)
from upstream.data.interventions import (
    Interventions,
    ItemRef,
    Plan,
    allocate,
    load_hierarchy,
    parse_proportions,
    plan,
    shipped_hierarchies,
    water_fill,
)
from upstream.errors import UpstreamError
from upstream.shards.stage import ShardConfig

CIFAR100_COARSE = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}
#: torchvision's CIFAR100.classes: the fine names, in label order (alphabetical).
CIFAR100_FINE = sorted(f for names in CIFAR100_COARSE.values() for f in names.split())


def picture(seed: int) -> Image.Image:
    """A smooth random picture: its pHash survives small noise, brightness and JPEG."""
    grid = np.random.default_rng(seed).integers(40, 216, size=(16, 16, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((96, 96), Image.Resampling.BICUBIC)


def noisy(img: Image.Image, seed: int, sigma: float = 4.0) -> Image.Image:
    noise = np.random.default_rng(seed).normal(0.0, sigma, (img.height, img.width, 3))
    pixels = np.asarray(img, dtype=np.float64) + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def brighter(img: Image.Image, delta: int = 12) -> Image.Image:
    pixels = np.asarray(img, dtype=np.int16) + delta
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


class FakeSource(Source):
    """``counts[c]`` samples of class ``names[c]``, in class order; pictures and captions
    optional (by default every index gets its own distinct picture)."""

    def __init__(
        self,
        names: Sequence[str],
        counts: Sequence[int],
        *,
        kind: str = "fake",
        captions: Sequence[str] | None = None,
        pictures: Sequence[Image.Image | None] | None = None,
        has_labels: bool = True,
        offset: int = 0,
    ) -> None:
        super().__init__(names, np.repeat(np.arange(len(names)), counts).tolist(), "train")
        self.kind = kind
        self.has_labels = has_labels
        self.captions = captions
        self.pictures = pictures
        self.offset = offset

    def image(self, index: int) -> Image.Image:
        if self.pictures is None:
            return picture(self.offset + index)
        img = self.pictures[index]
        if img is None:
            raise BadImage(f"sample {index} is unreadable")
        return img

    def caption(self, index: int) -> str | None:
        return self.captions[index] if self.captions is not None else None


def captions_of(sources: Sequence[Source]) -> Callable[[int, int], str]:
    def caption_of(s: int, i: int) -> str:
        src = sources[s]
        own = src.caption(i)
        return own if own is not None else f"a photo of a {src.class_names[src.labels[i]]}."

    return caption_of


class Hasher:
    """The real hashes, as the shard writer computes them; remembers whether it was called."""

    def __init__(self, sources: Sequence[Source]) -> None:
        self.sources = sources
        self.calls = 0

    def __call__(self, refs: list[ItemRef], mode: str) -> list[int | None]:
        self.calls += 1
        fn = content_hash if mode == "exact" else phash
        out: list[int | None] = []
        for s, i in refs:
            try:
                out.append(fn(self.sources[s].image(i)))
            except BadImage:
                out.append(None)
        return out


def run(sources: Sequence[Source], **settings: object) -> Plan:
    return plan(
        sources,
        Interventions(**settings),  # type: ignore[arg-type]
        caption_of=captions_of(sources),
        hashes_of=Hasher(sources),
    )


def counts(p: Plan) -> dict[str, int]:
    found = Counter(p.class_names[label] for _, _, label in p.items)
    assert p.record["class_counts"] == {n: found.get(n, 0) for n in p.class_names}
    return p.record["class_counts"]


def per_source(p: Plan) -> Counter[int]:
    return Counter(s for s, _, _ in p.items)


def steps(p: Plan) -> list[str]:
    return [step["step"] for step in p.record["steps"]]


# --- size: num_samples, water-filling, samples_per_class -----------------------------------


def test_num_samples_is_class_balanced_with_the_extra_in_label_order() -> None:
    src = FakeSource(["a", "b", "c"], [50, 50, 50])
    p = run([src], num_samples=100)
    assert counts(p) == {"a": 34, "b": 33, "c": 33}
    assert len(p.items) == 100
    assert p.items == sorted(p.items)  # canonical order: the writer shuffles


def test_water_filling_gives_a_short_class_all_it_has_and_spreads_the_rest() -> None:
    src = FakeSource(["a", "short", "b", "c"], [50, 5, 50, 50])
    assert counts(run([src], num_samples=101)) == {"a": 32, "short": 5, "b": 32, "c": 32}
    assert counts(run([src], num_samples=100)) == {"a": 32, "short": 5, "b": 32, "c": 31}
    # Two short classes, one of which saturates only after the other's rest is spread.
    src = FakeSource(["a", "b", "c"], [2, 9, 100])
    assert counts(run([src], num_samples=30)) == {"a": 2, "b": 9, "c": 19}


@pytest.mark.parametrize("trial", range(50))
def test_water_fill_is_as_even_as_the_classes_allow(trial: int) -> None:
    rng = random.Random(trial)
    available = [rng.randint(0, 30) for _ in range(rng.randint(1, 9))]
    total = rng.randint(0, sum(available))
    take = water_fill(available, total)
    assert sum(take) == total
    assert all(0 <= t <= a for t, a in zip(take, available, strict=True))
    short = [t for t, a in zip(take, available, strict=True) if t < a]
    if short:
        # Classes not given all they have differ by at most one and get at least as much as
        # any class that was given all it has.
        assert max(short) - min(short) <= 1
        assert all(t <= min(short) + 1 for t in take)
    assert water_fill(available, total) == take


def test_num_samples_larger_than_the_data_fails_before_hashing() -> None:
    src = FakeSource(["a", "b"], [10, 7])
    hasher = Hasher([src])
    with pytest.raises(UpstreamError, match=r"num_samples=18 but only 17 images are left"):
        plan(
            [src],
            Interventions(num_samples=18, dedup="near"),
            caption_of=captions_of([src]),
            hashes_of=hasher,
        )
    assert hasher.calls == 0
    # Too few after class selection: the message names the steps that left too few.
    with pytest.raises(UpstreamError, match=r"only 10 images are left after classes"):
        run([src], classes="a", num_samples=11)


def test_samples_per_class_caps_each_class_by_a_seeded_choice() -> None:
    src = FakeSource(["a", "b", "c"], [30, 4, 12])
    p = run([src], samples_per_class=10)
    assert counts(p) == {"a": 10, "b": 4, "c": 10}
    assert run([src], samples_per_class=10, seed=1).items != p.items
    # Then num_samples balances what the cap left: 24 over a:10, b:4, c:10.
    assert counts(run([src], samples_per_class=10, num_samples=22)) == {"a": 9, "b": 4, "c": 9}


def test_generated_sources_are_not_cut_again(tmp_path: Path) -> None:
    """fractals/shapes were made with num_classes × samples_per_class: plan leaves them."""
    made = FakeSource(["f0", "f1", "f2"], [5, 5, 5], kind="fractals")
    p = run([made], num_classes=3, samples_per_class=5)
    assert counts(p) == {"f0": 5, "f1": 5, "f2": 5}
    assert p.record["steps"][0]["made_by_source"] == [0]
    assert p.record["steps"][1]["skipped_sources"] == [0]
    # Nor does the per-class cap bite after a coarse relabel: 5 instances per category made.
    (tmp_path / "h.json").write_text(json.dumps({"f0": "g", "f1": "g", "f2": "h"}))
    p = run([made], samples_per_class=5, label_level="coarse", hierarchy=str(tmp_path / "h.json"))
    assert counts(p) == {"g": 10, "h": 5}
    # A fixed source beside it is capped.
    fixed = FakeSource(["f0", "x"], [9, 9], offset=100)
    assert counts(run([made, fixed], samples_per_class=5)) == {"f0": 10, "f1": 5, "f2": 5, "x": 5}


# --- class selection --------------------------------------------------------------------------


def test_num_classes_keeps_each_sources_first_classes() -> None:
    src = FakeSource(["a", "b", "c", "d", "e"], [4, 4, 4, 4, 4])
    p = run([src], num_classes=3)
    assert p.class_names == ["a", "b", "c"]
    assert counts(p) == {"a": 4, "b": 4, "c": 4}
    with pytest.raises(UpstreamError, match=r"has 5 classes; num_classes=6 asks for more"):
        run([src], num_classes=6)


def test_classes_by_name_keep_the_source_order() -> None:
    src = FakeSource(["cat", "dog", "bird", "fish"], [3, 4, 5, 6])
    p = run([src], classes="fish, cat")
    assert p.class_names == ["cat", "fish"]
    assert counts(p) == {"cat": 3, "fish": 6}
    assert {src.labels[i] for _, i, _ in p.items} == {0, 3}


def test_unknown_class_fails_naming_it_and_suggesting_a_near_name() -> None:
    src = FakeSource(["cat", "dog", "aquarium_fish"], [1, 1, 1])
    with pytest.raises(UpstreamError, match=r"unknown class 'aquarium fish'.*aquarium_fish"):
        run([src], classes="aquarium fish")
    with pytest.raises(UpstreamError, match=r"unknown class 'zebra'.*3 known: cat, dog"):
        run([src], classes="cat,zebra")
    with pytest.raises(UpstreamError, match=r"'dog' is not among the first num_classes=1"):
        run([src], classes="dog", num_classes=1)


def test_classes_by_superclass_group() -> None:
    src = FakeSource(CIFAR100_FINE, [2] * 100)
    p = run([src], classes="group:trees, group:people, rose", hierarchy="cifar100")
    trees = CIFAR100_COARSE["trees"].split()
    people = CIFAR100_COARSE["people"].split()
    assert sorted(p.class_names) == sorted([*trees, *people, "rose"])
    assert p.class_names == [n for n in CIFAR100_FINE if n in p.class_names]
    assert sum(counts(p).values()) == 22
    with pytest.raises(UpstreamError, match=r"unknown superclass 'tree'.*'trees'"):
        run([src], classes="group:tree", hierarchy="cifar100")


def test_a_group_with_no_class_in_the_data_fails() -> None:
    src = FakeSource(["apple", "bee"], [1, 1])
    with pytest.raises(UpstreamError, match=r"superclass 'trees' has no class in the data"):
        run([src], classes="group:trees", hierarchy="cifar100")


# --- label granularity ------------------------------------------------------------------------


def test_coarse_labels_relabel_cifar100_to_its_20_superclasses() -> None:
    src = FakeSource(CIFAR100_FINE, [3] * 100)
    p = run([src], label_level="coarse", hierarchy="cifar100")
    assert p.class_names == sorted(CIFAR100_COARSE)  # CIFAR-100's own coarse label order
    assert counts(p) == dict.fromkeys(sorted(CIFAR100_COARSE), 15)
    for _, i, label in p.items:
        fine = src.class_names[src.labels[i]]
        assert fine in CIFAR100_COARSE[p.class_names[label]].split()
    step = p.record["steps"][0]
    assert (step["step"], step["classes_in"], step["classes_out"]) == ("label_level", 100, 20)
    assert step["map"]["trees"] == CIFAR100_COARSE["trees"].split()


def test_coarse_labels_with_a_class_subset_and_balanced_size() -> None:
    src = FakeSource(CIFAR100_FINE, list(range(1, 101)))
    p = run(
        [src],
        classes="group:trees,group:flowers,bee",
        label_level="coarse",
        hierarchy="cifar100",
        num_samples=60,
    )
    assert p.class_names == ["flowers", "insects", "trees"]
    bee = CIFAR100_FINE.index("bee") + 1  # bee has that many samples: 7
    assert counts(p) == {"flowers": (60 - bee) // 2 + 1, "insects": bee, "trees": (60 - bee) // 2}


def test_a_hierarchy_that_leaves_classes_unmapped_fails_before_any_work() -> None:
    src = FakeSource(["apple", "unicorn", "bee", "griffin"], [2, 2, 2, 2])
    hasher = Hasher([src])
    with pytest.raises(
        UpstreamError, match=r"hierarchy cifar100 leaves 2 class\(es\) unmapped: unicorn, griffin"
    ):
        plan(
            [src],
            Interventions(label_level="coarse", hierarchy="cifar100", dedup="exact"),
            caption_of=captions_of([src]),
            hashes_of=hasher,
        )
    assert hasher.calls == 0
    # Selecting only mapped classes is fine.
    p = run([src], classes="apple,bee", label_level="coarse", hierarchy="cifar100")
    assert counts(p) == {"fruit_and_vegetables": 2, "insects": 2}


# --- hierarchies --------------------------------------------------------------------------


def test_shipped_cifar100_has_100_classes_in_20_superclasses_of_5() -> None:
    assert "cifar100" in shipped_hierarchies()
    h = load_hierarchy("cifar100")
    assert sorted(h) == CIFAR100_FINE
    assert len(h) == 100
    by_group = Counter(h.values())
    assert len(by_group) == 20
    assert set(by_group.values()) == {5}
    assert {f: g for g, names in CIFAR100_COARSE.items() for f in names.split()} == h


def test_shipped_hierarchies_are_package_data() -> None:
    folder = Path(__file__).parents[1] / "src" / "upstream" / "data" / "hierarchies"
    for name in shipped_hierarchies():
        assert json.loads((folder / f"{name}.json").read_text()) == load_hierarchy(name)
    text = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert "hierarchies/*.json" in text


def test_hierarchy_files_json_csv_tsv(tmp_path: Path) -> None:
    expected = {"cat": "animal", "dog": "animal", "car": "vehicle"}
    (tmp_path / "h.json").write_text(json.dumps(expected))
    (tmp_path / "g.json").write_text(json.dumps({"animal": ["cat", "dog"], "vehicle": ["car"]}))
    (tmp_path / "h.csv").write_text(
        "fine,coarse\ncat,animal\n\n# a comment\ndog, animal\ncar,vehicle\n"
    )
    (tmp_path / "h.tsv").write_text("cat\tanimal\ndog\tanimal\ncar\tvehicle\n")
    for name in ("h.json", "g.json", "h.csv", "h.tsv"):
        assert load_hierarchy(str(tmp_path / name)) == expected
    src = FakeSource(["cat", "car", "dog"], [2, 3, 4])
    p = run([src], label_level="coarse", hierarchy=str(tmp_path / "h.csv"))
    assert counts(p) == {"animal": 6, "vehicle": 3}


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.csv", "cat,animal\ndog\n", r"bad.csv line 2: expected two columns"),
        ("bad.json", "[1, 2]", r"expected a JSON object"),
        ("bad2.json", "{not json", r"not valid JSON"),
        ("twice.csv", "cat,animal\ncat,vehicle\n", r"'cat' maps to both 'animal' and 'vehicle'"),
        ("empty.csv", "fine,coarse\n", r"is empty"),
    ],
)
def test_bad_hierarchy_files_fail_in_one_line(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(UpstreamError, match=message) as err:
        load_hierarchy(str(tmp_path / name))
    assert "\n" not in str(err.value)


def test_hierarchy_and_word_list_from_s3(moto_s3: str) -> None:
    from upstream import storage

    storage.write_bytes(f"s3://{moto_s3}/h.csv", b"cat,animal\ncar,vehicle\n")
    storage.write_bytes(f"s3://{moto_s3}/words.txt", b"red\n")
    src = FakeSource(["cat", "car"], [2, 2], captions=["a red cat", "a cat", "red car", "car"])
    p = run(
        [src],
        label_level="coarse",
        hierarchy=f"s3://{moto_s3}/h.csv",
        caption_require=f"@s3://{moto_s3}/words.txt",
    )
    assert counts(p) == {"animal": 1, "vehicle": 1}
    with pytest.raises(UpstreamError, match=r"does not exist"):
        run([src], label_level="coarse", hierarchy=f"s3://{moto_s3}/missing.json")


# --- caption filters ----------------------------------------------------------------------


CAPTIONS = [
    "a photo of a cat",  # 0 cat
    "A DOG on the beach",  # 1 dog, any case
    "concatenate strings",  # 2 'cat' only inside a word
    "hot-dog stand at night",  # 3 'dog' as a whole word next to '-'
    "a cat and a dog, blurry",  # 4 both, and 'blurry'
    "nothing here",  # 5
    "Blurry photo of a cat.",  # 6 cat, 'blurry' capitalised
    "dogs everywhere",  # 7 plural is another word
]


def caption_source() -> FakeSource:
    return FakeSource(["x", "y"], [4, 4], captions=CAPTIONS)


def kept_indices(p: Plan) -> list[int]:
    return [i for _, i, _ in p.items]


def test_caption_require_matches_whole_words_in_any_case() -> None:
    p = run([caption_source()], caption_require="cat, dog")
    assert kept_indices(p) == [0, 1, 3, 4, 6]
    assert counts(p) == {"x": 3, "y": 2}
    step = p.record["steps"][0]
    assert step["removed_without_required"] == 3
    assert step["examples"] == [[0, 2], [0, 5], [0, 7]]


def test_caption_exclude_from_a_file(tmp_path: Path) -> None:
    words = tmp_path / "bad.txt"
    words.write_text("# words to drop\nblurry\n\nhot-dog\n")
    p = run([caption_source()], caption_exclude=f"@{words}")
    assert kept_indices(p) == [0, 1, 2, 5, 7]
    step = p.record["steps"][0]
    assert step["exclude"]["file"] == str(words)
    assert step["exclude"]["count"] == 2
    assert step["removed_with_excluded"] == 3


def test_caption_require_and_exclude_together() -> None:
    p = run([caption_source()], caption_require="cat", caption_exclude="blurry")
    assert kept_indices(p) == [0]


def test_caption_filter_uses_templated_captions_of_label_only_sources() -> None:
    src = FakeSource(["cat", "dog"], [3, 2])
    p = run([src], caption_exclude="dog")
    assert counts(p) == {"cat": 3, "dog": 0}  # the label space stays, dog is just empty


def test_missing_word_file_fails(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError, match=r"missing.txt does not exist"):
        run([caption_source()], caption_require=f"@{tmp_path / 'missing.txt'}")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(UpstreamError, match=r"has no words"):
        run([caption_source()], caption_require=f"@{tmp_path / 'empty.txt'}")


# --- de-duplication -----------------------------------------------------------------------


def test_phash_survives_small_changes_and_tells_distinct_pictures_apart() -> None:
    base = [picture(k) for k in range(6)]
    hashes = [phash(img) for img in base]
    for img, h in zip(base, hashes, strict=True):
        assert (phash(noisy(img, 0)) ^ h).bit_count() <= 4
        assert (phash(brighter(img)) ^ h).bit_count() <= 4
        assert (phash(img.resize((64, 64), Image.Resampling.BILINEAR)) ^ h).bit_count() <= 4
    for a in range(6):
        for b in range(a + 1, 6):
            assert (hashes[a] ^ hashes[b]).bit_count() > 10
    assert all(0 <= h < 2**64 for h in hashes)


def test_content_hash_is_exact() -> None:
    img = picture(0)
    assert content_hash(img) == content_hash(img.copy())
    assert content_hash(img) == content_hash(img.convert("RGBA"))
    assert content_hash(img) != content_hash(brighter(img, 1))
    assert content_hash(img) != content_hash(img.crop((0, 0, 96, 95)))


def near_dup_sources() -> list[FakeSource]:
    """Two sources: pictures 0-5, with exact and near copies within and across them."""
    p = [picture(k) for k in range(6)]
    first = [p[0], p[1], p[0].copy(), noisy(p[1], 1), p[2], brighter(p[2]), p[3], None]
    second = [p[3].copy(), noisy(p[0], 2), p[4], p[5], brighter(p[5])]
    return [
        FakeSource(["a", "b"], [4, 4], pictures=first),
        FakeSource(["b", "c"], [2, 3], pictures=second),
    ]


def test_exact_dedup_keeps_the_first_copy_across_sources() -> None:
    sources = near_dup_sources()
    p = run(sources, dedup="exact")
    dropped = {(0, 2), (1, 0)}  # p0's copy in source 0; p3's copy in source 1
    assert p.unreadable == [(0, 7)]
    assert [(s, i) for s, i, _ in p.items] == [
        (s, i)
        for s, src in enumerate(sources)
        for i in range(len(src))
        if (s, i) not in dropped and (s, i) != (0, 7)
    ]
    step = p.record["steps"][0]
    assert (step["mode"], step["in"], step["out"], step["removed"]) == ("exact", 13, 10, 2)
    assert step["unreadable"] == 1
    assert step["examples"] == [[[0, 0], [0, 2]], [[0, 6], [1, 0]]]
    assert counts(p) == {"a": 3, "b": 4, "c": 3}


def test_near_dedup_merges_small_changes_but_not_distinct_pictures() -> None:
    sources = near_dup_sources()
    p = run(sources, dedup="near", dedup_distance=4)
    kept = [(s, i) for s, i, _ in p.items]
    # One survivor for each of the six pictures: its first appearance.
    assert kept == [(0, 0), (0, 1), (0, 4), (0, 6), (1, 2), (1, 3)]
    step = p.record["steps"][0]
    assert (step["mode"], step["distance"], step["removed"], step["unreadable"]) == (
        "near",
        4,
        6,
        1,
    )
    assert [pair[1] for pair in step["examples"]] == [
        [0, 2],
        [0, 3],
        [0, 5],
        [1, 0],
        [1, 1],
        [1, 4],
    ]
    assert step["examples"][4] == [[0, 0], [1, 1]]
    assert counts(p) == {"a": 2, "b": 2, "c": 2}


def test_dedup_then_size_counts_only_survivors() -> None:
    pics = [picture(k % 5) for k in range(20)]  # 5 distinct pictures, each 4 times
    src = FakeSource(["a", "b"], [10, 10], pictures=pics)
    p = run([src], dedup="exact", num_samples=5)
    assert len(p.items) == 5
    with pytest.raises(UpstreamError, match=r"only 5 images are left after dedup"):
        run([src], dedup="exact", num_samples=6)


def brute_force_pairs(hashes: Sequence[int | None], distance: int) -> list[tuple[int, int]]:
    kept: list[int] = []
    out = []
    for j, h in enumerate(hashes):
        if h is None:
            continue
        match = [k for k in kept if (hashes[k] ^ h).bit_count() <= distance]  # type: ignore[operator]
        if match:
            out.append((match[0], j))
        else:
            kept.append(j)
    return out


@pytest.mark.parametrize("distance", [0, 1, 3, 4, 7, 12])
def test_banded_search_finds_exactly_what_all_pairs_would(distance: int) -> None:
    rng = random.Random(distance)
    centres = [rng.getrandbits(64) for _ in range(40)]
    hashes: list[int | None] = []
    for _ in range(400):
        if rng.random() < 0.05:
            hashes.append(None)
            continue
        h = rng.choice(centres)
        for _ in range(rng.randint(0, 8)):
            h ^= 1 << rng.randrange(64)
        hashes.append(h)
    assert near_duplicate_pairs(hashes, distance) == brute_force_pairs(hashes, distance)
    assert near_duplicates(hashes, distance) == [d for _, d in brute_force_pairs(hashes, distance)]
    assert exact_duplicate_pairs(hashes) == brute_force_pairs(hashes, 0)


def test_near_duplicates_scale_past_all_pairs() -> None:
    """100k hashes: all pairs would be 5·10⁹ comparisons; banding does it in well under a
    few seconds (planted pairs found, random ones not)."""
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, size=100_000, dtype=np.int64)]
    hashes[50_000] = hashes[10] ^ 0b1011  # 3 bits from an earlier one
    hashes[70_000] = hashes[20] ^ (1 << 63)
    assert near_duplicate_pairs(hashes, 4) == [(10, 50_000), (20, 70_000)]


# --- mixtures and proportions ------------------------------------------------------------


def test_mixture_classes_merge_by_name() -> None:
    a = FakeSource(["cat", "dog"], [3, 4])
    b = FakeSource(["dog", "bird"], [5, 6], offset=1000)
    p = run([a, b])
    assert p.class_names == ["cat", "dog", "bird"]
    assert counts(p) == {"cat": 3, "dog": 9, "bird": 6}
    assert counts(run([a, b], num_samples=12)) == {"cat": 3, "dog": 5, "bird": 4}


def test_proportions_with_num_samples_give_exact_source_counts() -> None:
    a = FakeSource(["cat", "dog"], [100, 100])
    b = FakeSource(["dog", "bird", "fish"], [50, 50, 3], offset=1000)
    p = run([a, b], proportions="0.7,0.3", num_samples=100)
    assert per_source(p) == {0: 70, 1: 30}
    # Balanced within each source: a's 70 → 35/35; b's 30 → fish 3, then 14/13.
    assert Counter((s, p.class_names[c]) for s, _, c in p.items) == {
        (0, "cat"): 35,
        (0, "dog"): 35,
        (1, "dog"): 14,
        (1, "bird"): 13,
        (1, "fish"): 3,
    }
    assert counts(p) == {"cat": 35, "dog": 49, "bird": 13, "fish": 3}
    step = p.record["steps"][0]
    assert step["step"] == "proportions"
    assert step["per_source"] == [
        {"source": 0, "available": 200, "taken": 70},
        {"source": 1, "available": 103, "taken": 30},
    ]


def test_proportion_rounding_keeps_the_total() -> None:
    assert allocate(100, parse_proportions("0.3333333,0.3333333,0.3333334", 3)) == [33, 33, 34]
    assert allocate(10, parse_proportions("0.25,0.25,0.5", 3)) == [3, 2, 5]
    srcs = [FakeSource(["a"], [50], offset=100 * k) for k in range(3)]
    p = run(srcs, proportions="0.3333333,0.3333333,0.3333334", num_samples=100)
    assert per_source(p) == {0: 33, 1: 33, 2: 34}


def test_proportions_without_num_samples_take_the_most_available() -> None:
    a = FakeSource(["cat"], [100])
    b = FakeSource(["dog"], [20], offset=1000)
    p = run([a, b], proportions="0.7,0.3")
    # b limits: 20 / 0.3 → 66 in all, 46 + 20.
    assert per_source(p) == {0: 46, 1: 20}
    assert p.record["steps"][0]["num_samples"] == 66


def test_proportions_asking_a_source_for_too_much_fail_with_what_is_available() -> None:
    a = FakeSource(["cat"], [100])
    b = FakeSource(["dog"], [20], offset=1000)
    with pytest.raises(
        UpstreamError,
        match=r"num_samples=100 at proportion 0.3 asks source 2 \(fake\) for 30 images but it "
        r"has 20; at these proportions at most 66 are available",
    ):
        run([a, b], proportions="0.7,0.3", num_samples=100)


# --- unlabelled sources ----------------------------------------------------------------------


def test_unlabelled_sources() -> None:
    plain = FakeSource(["unlabeled"], [30], has_labels=False, kind="captions")
    p = run([plain], num_samples=10)
    assert counts(p) == {"unlabeled": 10}
    assert p.labelled is False
    with pytest.raises(UpstreamError, match=r"classes needs labels, but the source \(captions\)"):
        run([plain], classes="cat")
    labelled = FakeSource(["cat", "dog"], [20, 20], offset=1000)
    with pytest.raises(
        UpstreamError, match=r"source 1 \(captions\) is unlabelled: give proportions"
    ):
        run([plain, labelled], num_samples=10)
    p = run([plain, labelled], num_samples=10, proportions="0.5,0.5", classes="cat")
    assert p.class_names == ["unlabeled", "cat"]  # unlabelled data passes class selection
    assert counts(p) == {"unlabeled": 5, "cat": 5}
    assert p.labelled is True


# --- determinism and the record -------------------------------------------------------------


def test_same_seed_same_plan_and_other_seeds_other_images_same_counts() -> None:
    a = FakeSource(["cat", "dog", "bird"], [40, 30, 7])
    b = FakeSource(["dog", "fish"], [25, 25], offset=1000)
    settings = {"num_samples": 60, "proportions": "0.5,0.5", "samples_per_class": 20}
    first = run([a, b], seed=3, **settings)
    again = run([a, b], seed=3, **settings)
    other = run([a, b], seed=4, **settings)
    assert first.items == again.items
    assert json.dumps(first.record, sort_keys=True) == json.dumps(again.record, sort_keys=True)
    assert other.items != first.items
    assert counts(other) == counts(first)


def test_a_smaller_size_is_a_subset_of_a_larger_one() -> None:
    src = FakeSource(["a", "b", "c"], [40, 40, 40])
    small = set(run([src], num_samples=30, seed=7).items)
    large = set(run([src], num_samples=90, seed=7).items)
    assert small < large


def test_record_lists_every_step_in_order_with_counts_that_chain() -> None:
    words = ["a photo", "a blurry photo"]
    src = FakeSource(
        CIFAR100_FINE[:10],
        [12] * 10,
        captions=[words[k % 7 == 0] for k in range(120)],
        pictures=[picture(k % 30) for k in range(120)],
    )
    p = run(
        [src],
        num_classes=8,
        classes="apple,bear,bee,bed",
        label_level="coarse",
        hierarchy="cifar100",
        caption_exclude="blurry",
        dedup="exact",
        samples_per_class=15,
        num_samples=20,
        seed=5,
    )
    assert steps(p) == [
        "num_classes",
        "classes",
        "label_level",
        "caption_filter",
        "dedup",
        "samples_per_class",
        "num_samples",
    ]
    chain = p.record["steps"]
    for before, after in zip(chain, chain[1:], strict=False):
        assert after["in"] == before["out"]
    assert chain[0]["in"] == 120 and chain[0]["out"] == 96
    assert chain[1]["selected"] == ["apple", "bear", "bed", "bee"]
    assert chain[4]["removed"] > 0
    assert chain[-1]["out"] == len(p.items) == 20 == p.record["num_samples"]
    assert p.class_names == [
        "fruit_and_vegetables",
        "household_furniture",
        "insects",
        "large_carnivores",
    ]
    assert sum(p.record["class_counts"].values()) == 20
    assert json.loads(json.dumps(p.record)) == p.record
    # Nothing asked, nothing recorded but the counts.
    bare = run([src])
    assert bare.record["steps"] == [] and bare.record["num_samples"] == 120


# --- data-free checks (the ShardConfig validator) -------------------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"label_level": "coarse"}, r"label_level=coarse needs a hierarchy"),
        ({"classes": "group:trees"}, r"classes=group:trees needs a hierarchy"),
        ({"classes": "cat, group: ", "hierarchy": "cifar100"}, r"'group:' needs a superclass"),
        (
            {"hierarchy": "imagenet21k"},
            r"unknown hierarchy 'imagenet21k': shipped ones are cifar10",
        ),
        ({"hierarchy": "/data/map.txt"}, r"must end in .json, .csv or .tsv"),
        ({"caption_require": "@"}, r"caption_require: '@' needs a file name"),
        ({"caption_exclude": "cat,@words.txt"}, r"caption_exclude: '@words.txt' — use @FILE alone"),
        ({"dedup": "fuzzy"}, r"dedup must be one of none, exact, near"),
        ({"proportions": "0.5,0.6"}, r"proportions must sum to 1"),
        ({"proportions": "1"}, r"proportions has 1 values for 2 source"),
        ({"proportions": "1.5,-0.5"}, r"must not be negative"),
    ],
)
def test_check_rejects_bad_syntax_without_data(settings: dict, message: str) -> None:
    with pytest.raises(UpstreamError, match=message):
        Interventions(**settings).check(2)


def test_check_accepts_good_settings() -> None:
    Interventions(
        classes="cat, group:trees",
        hierarchy="cifar100",
        label_level="coarse",
        caption_require="cat,hot-dog",
        caption_exclude="@s3://bucket/words.txt",
        proportions="0.7,0.3",
        dedup="near",
    ).check(2)
    Interventions(hierarchy="s3://bucket/maps/h.csv").check(1)


def test_shard_config_runs_the_checks() -> None:
    with pytest.raises(UpstreamError, match=r"label_level=coarse needs a hierarchy"):
        ShardConfig.parse(label_level="coarse")
    with pytest.raises(UpstreamError, match=r"unknown hierarchy"):
        ShardConfig.parse(hierarchy="nope")
    config = ShardConfig.parse(
        source="fractals+shapes", proportions="0.5,0.5", num_samples=10, dedup="near"
    )
    assert Interventions.from_config(config).dedup == "near"
