"""The components and pipeline parameters are derived from the stage config models."""

from __future__ import annotations

import pytest
from kfp import compiler

from upstream.components.factory import describe, kfp_type
from upstream.components.stages import (
    corrupt_op,
    evaluate_op,
    finetune_op,
    pretrain_op,
    report_op,
    scratch_op,
    shard_op,
)
from upstream.config import StageConfig
from upstream.errors import UpstreamError
from upstream.evaluate import CorruptConfig, EvaluateConfig
from upstream.finetune import FinetuneConfig
from upstream.pipelines.registry import stage_configs
from upstream.pipelines.transfer import PARAMS, transfer
from upstream.pretrain import PretrainConfig
from upstream.report import ReportConfig
from upstream.shards.stage import ShardConfig

KFP_TYPE = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN"}

STAGES: list[tuple[object, type[StageConfig], set[str], set[str]]] = [
    (shard_op, ShardConfig, {"data_root", "run_group"}, set()),
    (corrupt_op, CorruptConfig, {"data_root", "run_group"}, set()),
    (pretrain_op, PretrainConfig, {"work_root", "run_group"}, set()),
    (finetune_op, FinetuneConfig, {"work_root", "run_group"}, set()),
    # The scratch step is the fine-tuning stage with modes=scratch, set by its glue.
    (scratch_op, FinetuneConfig, {"work_root", "run_group"}, {"modes"}),
    (evaluate_op, EvaluateConfig, {"work_root", "run_group"}, set()),
    # The report reads the runs of its own pipeline run: the glue sets the group.
    (report_op, ReportConfig, {"work_root", "run_group"}, {"group"}),
]


@pytest.mark.parametrize(("op", "config", "extra", "dropped"), STAGES)
def test_component_parameters_are_the_config_knobs(op, config, extra, dropped) -> None:
    spec = op.component_spec
    params = {n: i for n, i in spec.inputs.items() if not i.type.startswith("system.")}
    assert set(params) == (set(config.knob_fields()) - dropped) | extra
    for name, field in config.knob_fields().items():
        if name in dropped:
            continue
        assert params[name].default == field.default, name
        assert params[name].description == describe(field)
        assert kfp_type(field).__name__ in ("str", "int", "float", "bool")


@pytest.mark.parametrize(("op", "config", "extra", "dropped"), STAGES)
def test_wiring_fields_are_not_parameters(op, config, extra, dropped) -> None:
    wiring = set(config.model_fields) - set(config.knob_fields())
    assert wiring, "every stage has a location field"
    assert not wiring & set(op.component_spec.inputs or {}) - {"model", "data", "id_data",
                                                               "ood_data", "pretrained"}


def test_pipeline_parameters_in_yaml(tmp_path) -> None:
    import yaml

    out = tmp_path / "transfer.yaml"
    compiler.Compiler().compile(transfer, str(out))
    spec = next(yaml.safe_load_all(out.read_text()))  # then the platform (k8s) spec
    declared = spec["root"]["inputDefinitions"]["parameters"]
    assert set(declared) == {p.name for p in PARAMS}
    for p in PARAMS:
        assert declared[p.name]["parameterType"] == KFP_TYPE[p.type]
        assert declared[p.name]["defaultValue"] == p.default
        assert declared[p.name]["description"] == p.description
    # the pretrain knobs are all there, prefixed, with the config's defaults
    assert declared["pretrain_lr"]["defaultValue"] == PretrainConfig.model_fields["lr"].default
    # list-valued knobs are comma lists (ints inside KFP lists arrive as floats locally)
    assert declared["finetune_shots"]["parameterType"] == "STRING"
    assert declared["finetune_shots"]["defaultValue"] == "1,5,10,0"
    assert declared["scratch_lrs"]["defaultValue"] == ""
    assert {"report_metric", "report_baseline", "ood_suite_corruptions"} <= set(declared)
    assert "report_group" not in declared and "finetune_model" not in declared


def test_compiled_yaml_has_no_credentials(tmp_path) -> None:
    out = tmp_path / "transfer.yaml"
    compiler.Compiler().compile(transfer, str(out))
    text = out.read_text()
    assert "upstream-s3" in text  # the Secret is named ...
    assert "AWS_SECRET_ACCESS_KEY" in text  # ... and mapped to env
    assert "aws_secret_access_key =" not in text.lower()


def test_stage_configs_accept_defaults_and_name_bad_values() -> None:
    configs = stage_configs("transfer", {})
    assert [c.stage for c in configs] == ["shard"] * 3 + [
        "corrupt", "pretrain", "finetune", "finetune", "evaluate", "report"]
    assert configs[6].mode_list == ["scratch"] and configs[6].model == "upstream-tiny-rn"
    with pytest.raises(UpstreamError, match="finetune: invalid lrs"):
        stage_configs("transfer", {"scratch_lrs": "1e-3,0"})
    with pytest.raises(UpstreamError, match="corrupt: invalid corruptions"):
        stage_configs("transfer", {"ood_suite_corruptions": "fog,smog"})
    with pytest.raises(UpstreamError, match="report: invalid metric"):
        stage_configs("transfer", {"report_metric": "top3"})
    with pytest.raises(UpstreamError, match="pretrain: invalid lr"):
        stage_configs("transfer", {"pretrain_lr": -0.1})
    with pytest.raises(UpstreamError, match="pretrain: invalid method"):
        stage_configs("transfer", {"pretrain_method": "moco"})
    with pytest.raises(UpstreamError, match="invalid pretrain_gpus"):
        stage_configs("transfer", {"pretrain_gpus": -1})
    with pytest.raises(UpstreamError, match="shard: invalid corruption"):
        stage_configs("transfer", {"ood_corruption": "fog2"})
    with pytest.raises(UpstreamError, match="proportions must sum to 1"):
        stage_configs("transfer", {"pretrain_data_source": "fractals+shapes",
                                   "pretrain_data_proportions": "0.5,0.6"})


def test_every_data_intervention_is_a_pipeline_parameter() -> None:
    from upstream.pipelines.transfer import PARAMS
    from upstream.shards.stage import ShardConfig

    names = {p.name for p in PARAMS}
    for field in ("source", "proportions", "num_samples", "classes", "hierarchy",
                  "label_level", "captions", "caption_template", "caption_require",
                  "caption_exclude", "dedup", "dedup_distance", "shard_bytes", "min_shards"):
        assert "pretrain_data_" + field in names, field
        assert field in ShardConfig.knob_fields()
    assert {"downstream_kshot", "image_resize", "jpeg_quality", "data_workers"} <= names
