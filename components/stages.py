"""The stage components. Their parameters come from the stage config models."""

from __future__ import annotations

from upstream.components.factory import Param, stage_component
from upstream.evaluate import CorruptConfig, EvaluateConfig
from upstream.finetune import FinetuneConfig
from upstream.pretrain import PretrainConfig
from upstream.report import ReportConfig
from upstream.shards.stage import ShardConfig

DATA_ROOT = Param(
    "data_root",
    str,
    "s3://upstream/data",
    "Where shards are written: an s3:// prefix (or a folder every step can reach).",
)
WORK_ROOT = Param(
    "work_root",
    str,
    "s3://upstream/runs",
    "Where checkpoints and fine-tuned models are written: an s3:// prefix or a folder.",
)
RUN_GROUP = Param(
    "run_group", str, "", "Tag that groups the MLflow runs of one pipeline run."
)

shard_op = stage_component(
    ShardConfig,
    glue="run_shard",
    artifacts=[("dataset", "Output[Dataset]")],
    extra=[DATA_ROOT, RUN_GROUP],
)
pretrain_op = stage_component(
    PretrainConfig,
    glue="run_pretrain",
    artifacts=[
        ("data", "Input[Dataset]"),
        ("checkpoint", "Output[Model]"),
        ("plots", "Output[HTML]"),
    ],
    extra=[WORK_ROOT, RUN_GROUP],
)
corrupt_op = stage_component(
    CorruptConfig,
    glue="run_corrupt",
    artifacts=[("data", "Input[Dataset]"), ("suite", "Output[Dataset]")],
    extra=[DATA_ROOT, RUN_GROUP],
)
finetune_op = stage_component(
    FinetuneConfig,
    glue="run_finetune",
    artifacts=[
        ("pretrained", "Input[Model]"),
        ("data", "Input[Dataset]"),
        ("finetuned", "Output[Model]"),
        ("plots", "Output[HTML]"),
    ],
    extra=[WORK_ROOT, RUN_GROUP],
)
#: The scratch baseline: the fine-tuning stage with ``modes=scratch``, no checkpoint in.
scratch_op = stage_component(
    FinetuneConfig,
    glue="run_scratch",
    artifacts=[
        ("data", "Input[Dataset]"),
        ("finetuned", "Output[Model]"),
        ("plots", "Output[HTML]"),
    ],
    extra=[WORK_ROOT, RUN_GROUP],
    name="scratch",
    drop=("modes",),
)
evaluate_op = stage_component(
    EvaluateConfig,
    glue="run_evaluate",
    artifacts=[
        ("model", "Input[Model]"),
        ("id_data", "Input[Dataset]"),
        ("ood_data", "Input[Dataset]"),
        ("ood_suite", "Input[Dataset]"),
        ("metrics", "Output[Metrics]"),
        ("id_confusion", "Output[ClassificationMetrics]"),
        ("plots", "Output[HTML]"),
    ],
    extra=[WORK_ROOT, RUN_GROUP],
)
report_op = stage_component(
    ReportConfig,
    glue="run_report",
    artifacts=[("report", "Output[HTML]"), ("summary", "Output[Markdown]")],
    extra=[WORK_ROOT, RUN_GROUP],
    drop=("group",),
)
