"""The study spec and its plan: fields from the stage models, one-line errors naming the path
and line, the grid expanded into shared units, and the shipped miniature studies valid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from upstream.errors import UpstreamError
from upstream.finetune import FinetuneConfig
from upstream.pretrain import PretrainConfig
from upstream.shards.stage import ShardConfig
from upstream.study import plan as study_plan
from upstream.study import spec as study_spec

ROOT = Path(__file__).resolve().parents[1]

SPEC = """\
name: tiny
sources:
  fractals: {source: fractals, num_classes: 10, samples_per_class: 20}
  shapes: {source: shapes, samples_per_class: 20}
methods: [supervised, clip]
budgets:
  short: {train_samples: 320}
  long: {epochs: 2}
downstream:
  digits:
    source: digits
    ood:
      mixed: {corruption: mixed, severity: 3}
      corruptions: {suite: {corruptions: "gaussian_noise,contrast", severities: "1"}}
finetune: {modes: "lp,lp-ft", shots: "1,5,0", seeds: "0,1"}
report: {compare: "scratch,source,method"}
"""


def build(text: str = SPEC) -> study_plan.Plan:
    spec = study_spec.parse(text, "spec.yaml")
    return study_plan.build(spec, "s3://b/data", "s3://b/runs", text, "spec.yaml")


def error_of(text: str, check_sizes: bool = False) -> str:
    with pytest.raises(UpstreamError) as e:
        plan = build(text)
        if check_sizes:
            study_plan.check_sizes(plan, text, "spec.yaml")
    return str(e.value)


def test_sections_keep_the_stage_fields() -> None:
    # Name, type, default and description come from the stage config, not a second copy.
    for section, config, field in [
        (study_spec.SourceSpec, ShardConfig, "samples_per_class"),
        (study_spec.PretrainSettings, PretrainConfig, "lr"),
        (study_spec.FinetuneSettings, FinetuneConfig, "shots"),
        (study_spec.BudgetSpec, PretrainConfig, "epochs"),
    ]:
        mine, theirs = section.model_fields[field], config.model_fields[field]
        assert mine.annotation == theirs.annotation
        assert mine.default == theirs.default
        assert mine.description == theirs.description
    assert set(study_spec.FinetuneSettings.model_fields) == set(
        FinetuneConfig.knob_fields()) - {"model", "experiment"}


def test_plan_shares_units() -> None:
    plan = build()
    # 2 sources + digits train, test and the mixed copy; each sharded once.
    assert plan.count("shard") == 5
    assert plan.count("corrupt") == 1
    # sources × methods × budgets, each pre-trained once.
    assert plan.count("pretrain") == 2 * 2 * 2
    # every pre-trained model and the scratch tower, on the one downstream set.
    assert plan.count("finetune") == 8 + 1 == plan.count("evaluate")
    assert plan.count("report") == 1
    outputs = [u.output for k in study_plan.KINDS for u in plan.units[k]]
    assert len(outputs) == len(set(outputs))
    # The pre-training units read their source's shards; fine-tuning reads the train split.
    shard_of = {u.key: u.output for u in plan.units["shard"]}
    for u in plan.units["pretrain"]:
        name = u.config.source_name
        assert u.config.data == shard_of[f"shard {name}/train"]
    for f, e in zip(plan.units["finetune"], plan.evaluations, strict=True):
        assert f.config.data == shard_of["shard digits/train"]
        assert e.config.model == f.output
        assert e.config.id_data == shard_of["shard digits/test"]
        assert "mixed=" in e.config.ood_data and "corruptions=" in e.config.ood_data
    scratch = [u for u in plan.units["finetune"] if u.config.modes == "scratch"]
    assert len(scratch) == 1 and scratch[0].config.model == "upstream-tiny-rn"
    report = plan.report_config()
    assert sorted(report.evaluations.split(",")) == sorted(u.output for u in
                                                          plan.units["evaluate"])
    # The k-shot lists stored beside the train split are the grid's.
    train = next(u for u in plan.units["shard"] if u.key == "shard digits/train")
    assert train.config.kshot == "1,5" and train.config.kshot_trials == 2


def test_identical_sources_are_sharded_once() -> None:
    text = SPEC.replace("shapes: {source: shapes, samples_per_class: 20}",
                        "again: {source: fractals, num_classes: 10, samples_per_class: 20}")
    plan = build(text)
    assert plan.count("shard") == 4
    [shared] = [u for u in plan.units["shard"] if len(u.names) == 2]
    assert shared.names == ["sources.fractals", "sources.again"]
    # Named apart, they are two pre-training units (the name is the source in reports).
    assert plan.count("pretrain") == 8
    assert study_plan.summary(plan, {})["shared"] == {"shard": 1}


def test_plan_is_stable_and_items_are_json() -> None:
    a, b = build(), build()
    assert a.items("pretrain") == b.items("pretrain")
    for level in study_plan.LEVELS:
        for item in a.items(level):
            for key, value in item.items():
                assert isinstance(value, str), (level, key)
                if key in ("config", "finetune", "evaluate"):
                    json.loads(value)
    with pytest.raises(UpstreamError, match="no level"):
        a.items("bogus")


@pytest.mark.parametrize("change, message", [
    (("num_classes: 10", "num_clases: 10"),
     "sources.fractals.num_clases: unknown field (line 3)"),
    (("methods: [supervised, clip]", "methods: [supervised, byol]"),
     "methods.1: Input should be"),
    (("methods: [supervised, clip]", "methods: [supervised, supervised]"),
     "methods: 'supervised' is listed twice"),
    (("methods: [supervised, clip]", "methods: []"), "methods: name at least one"),
    (("severity: 3}", "severity: 9}"), "downstream.digits.ood.mixed.severity"),
    (("report: {compare: \"scratch,source,method\"}", "report: {compare: \"scratch,nosuch\"}"),
     "report.compare: unknown family 'nosuch'"),
    (("finetune: {modes: \"lp,lp-ft\"", "finetune: {modes: \"lp,scratch\""),
     "finetune.modes: scratch is the baseline"),
    (("finetune: {modes: \"lp,lp-ft\"", "finetune: {modes: \"lp,lp-fr\""),
     "finetune.modes: unknown mode 'lp-fr'"),
    (("source: digits", "source: nosuch"), "downstream.digits.source"),
    (("budgets:\n  short: {train_samples: 320}\n  long: {epochs: 2}\n", "towers: [nosuch]\n"),
     "towers.0"),
    (("name: tiny", "name: 'two words'"), "name: String should match"),
    (("report: {compare: \"scratch,source,method\"}", "report: {baseline: \"source=nosuch\"}"),
     "report.baseline: source=nosuch names no group of the grid"),
])
def test_bad_specs_are_one_line_errors(change: tuple[str, str], message: str) -> None:
    old, new = change
    assert old in SPEC
    text = error_of(SPEC.replace(old, new))
    assert text.startswith("study spec spec.yaml: ")
    assert message in text
    assert "\n" not in text


def test_a_comparison_needs_its_group_in_the_grid() -> None:
    text = SPEC.replace("methods: [supervised, clip]", "methods: [supervised]")
    assert "report.compare: compares methods, but the grid has one method" in error_of(text)
    text = SPEC.replace("report: {compare", "scratch: null\nreport: {compare")
    assert "no scratch baseline" in error_of(text)


def test_duplicate_names_are_refused_with_their_line() -> None:
    text = SPEC.replace("  shapes: {source: shapes", "  fractals: {source: shapes")
    message = error_of(text)
    assert "duplicate" in message or "found duplicate key" in message
    assert "(line 4)" in message


def test_empty_grid_and_missing_sections() -> None:
    assert "sources: name at least one" in error_of(SPEC.replace(
        "sources:\n  fractals: {source: fractals, num_classes: 10, samples_per_class: 20}\n"
        "  shapes: {source: shapes, samples_per_class: 20}\n", "sources: {}\n"))
    assert "downstream: required field is missing" in error_of(SPEC.split("downstream:")[0])


def test_k_against_the_smallest_class() -> None:
    text = SPEC.replace('shots: "1,5,0"', 'shots: "1,500,0"')
    plan = build(text)  # the fields are fine; the data is too small for k=500
    with pytest.raises(UpstreamError) as e:
        study_plan.check_sizes(plan, text, "spec.yaml")
    assert "finetune.shots: downstream set digits: k=500 shots" in str(e.value)
    assert "(line 15)" in str(e.value)


def test_yaml_errors_name_the_line() -> None:
    message = error_of(SPEC.replace("methods: [supervised, clip]", "methods: [supervised, clip"))
    assert "not valid YAML" in message and "(line" in message


@pytest.mark.parametrize("name", ["entezari-mini", "ramanujan-mini"])
def test_shipped_studies_validate(name: str) -> None:
    path = ROOT / "studies" / f"{name}.yaml"
    spec, text = study_spec.load(str(path))
    plan = study_plan.build(spec, "s3://b/data", "s3://b/runs", text, str(path))
    counts = study_plan.check_sizes(plan, text, str(path))
    summary = study_plan.summary(plan, counts)
    assert summary["estimate_s"] is not None and summary["estimate_s"] < 20 * 60
    assert spec.name == name


def test_entezari_mini_is_the_grid_the_issue_asks_for() -> None:
    spec, _ = study_spec.load(str(ROOT / "studies" / "entezari-mini.yaml"))
    assert len(spec.sources) >= 3 and len(spec.methods) >= 2 and spec.scratch is not None
    assert [int(k) for k in spec.finetune.shots.split(",")] == [1, 5, 10, 0]
    assert len(spec.finetune.seeds.split(",")) == 3
    assert list(spec.downstream) == ["clutter"]


def test_cli_plan_and_validate(tmp_path: Path) -> None:
    upstream = str(Path(sys.executable).with_name("upstream"))
    spec = tmp_path / "s.yaml"
    spec.write_text(SPEC)
    out = subprocess.run([upstream, "study", "plan", str(spec), "--json"], capture_output=True,
                         text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["units"] == {"shard": 5, "corrupt": 1, "pretrain": 8, "finetune": 9,
                                "evaluate": 9, "report": 1}
    assert len(summary["unit_list"]) == 33
    out = subprocess.run([upstream, "study", "validate", str(spec)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("ok: ")
    spec.write_text(SPEC.replace("num_classes: 10", "num_clases: 10"))
    bad = subprocess.run([upstream, "study", "validate", str(spec)], capture_output=True,
                         text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"error: study spec {spec}: sources.fractals.num_clases: unknown field (line 3)"]
