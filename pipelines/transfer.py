"""The ``transfer`` pipeline: shard → pretrain → fine-tuning grid and scratch baseline →
evaluate (ID, OOD, corruption suite) → report.

Four shard steps make the pre-training set, the downstream training set, the in-distribution
test set and a corrupted out-of-distribution copy; a corruption step turns the test set into
ImageNet-C's suite. One model is pre-trained; one fine-tuning step runs the grid of modes × k
shots × seeds × learning rates on it, and a scratch step trains the same tower from random
initialisation on the same k-shot splits (the baseline of every comparison). Both are evaluated
on every test set, and the report step reads this run's MLflow runs (by its ``upstream.group``
tag) into the figures and tables, shown in the Kubeflow UI as HTML and Markdown. Every parameter
takes its type, default and description from a stage config model; the few that set the same
field of several steps (image size, data seed, experiment) are shared.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from kfp import dsl, kubernetes

from upstream.components.factory import Param, knob_params, pipeline_function
from upstream.components.stages import (
    DATA_ROOT,
    WORK_ROOT,
    corrupt_op,
    evaluate_op,
    finetune_op,
    pretrain_op,
    report_op,
    scratch_op,
    shard_op,
)
from upstream.errors import UpstreamError
from upstream.evaluate import CorruptConfig, EvaluateConfig
from upstream.finetune import FinetuneConfig
from upstream.pretrain import PretrainConfig
from upstream.report import ReportConfig
from upstream.shards.stage import ShardConfig

#: Kubernetes Secret with the S3 keys and ConfigMap with the endpoints (the cluster provides
#: both), mounted as environment variables so that no credential is in the compiled YAML.
S3_SECRET = "upstream-s3"
SETTINGS_CONFIG_MAP = "upstream-settings"
SECRET_ENV = {
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
SETTINGS_ENV = {
    "AWS_ENDPOINT_URL_S3": "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI",
}

_SOURCE_HELP = ShardConfig.model_fields["source"].description or ""

#: Shard fields set once for all four data steps (pipeline parameters of their own).
SHARED_DATA = {"image_size": "image_size", "image_format": "image_format",
               "jpeg_quality": "jpeg_quality", "resize": "image_resize", "seed": "data_seed",
               "workers": "data_workers"}
#: Shard fields the pipeline sets per step itself.
PER_STEP = {"split", "corruption", "severity", "experiment", "kshot", "kshot_trials"}
#: Every other shard field is a knob of the pre-training data: ``pretrain_data_<field>``.
PRETRAIN_DATA_FIELDS = [
    f for f in ShardConfig.knob_fields() if f not in SHARED_DATA and f not in PER_STEP
]
_PRETRAIN_DATA_DEFAULTS: dict[str, Any] = {
    "source": "fractals", "num_classes": 10, "samples_per_class": 200,
}

#: The fine-tuning grid the embedded default runs (the config's own defaults are one model).
_FINETUNE_DEFAULTS: dict[str, Any] = {
    "finetune_modes": "lp,lp-ft", "finetune_shots": "1,5,10,0", "finetune_seeds": "0,1,2",
    "finetune_lrs": "1e-4,1e-3",
}


def _finetune_param(p: Param) -> Param:
    if p.name in _FINETUNE_DEFAULTS:
        return dataclasses.replace(p, default=_FINETUNE_DEFAULTS[p.name])
    return p


PARAMS: list[Param] = [
    Param.from_field(PretrainConfig, "experiment"),
    DATA_ROOT,
    WORK_ROOT,
    *[
        Param.from_field(
            ShardConfig,
            f,
            "pretrain_data_" + f,
            **({"default": _PRETRAIN_DATA_DEFAULTS[f]} if f in _PRETRAIN_DATA_DEFAULTS else {}),
            **({"description": "Pre-training data: " + _SOURCE_HELP} if f == "source" else {}),
        )
        for f in PRETRAIN_DATA_FIELDS
    ],
    Param.from_field(ShardConfig, "source", "downstream_source", default="digits",
                     description="Downstream data (train and test splits): " + _SOURCE_HELP),
    Param.from_field(ShardConfig, "kshot", "downstream_kshot",
                     description="k-shot splits of the downstream training set stored as index "
                     "lists beside its manifest (1,5,10); fine-tuning reads them."),
    Param.from_field(ShardConfig, "kshot_trials", "downstream_kshot_trials"),
    Param.from_field(ShardConfig, "corruption", "ood_corruption", default="mixed"),
    Param.from_field(ShardConfig, "severity", "ood_severity"),
    *[Param.from_field(ShardConfig, f, name) for f, name in SHARED_DATA.items()],
    *[p for p in knob_params(PretrainConfig, "pretrain_") if p.name != "pretrain_experiment"],
    Param("pretrain_gpus", int, 0, "GPUs the pretrain pod requests (0: none); set "
          "pretrain_procs_per_node to the same number to train on all of them."),
    Param("pretrain_accelerator", str, "nvidia.com/gpu",
          "Kubernetes resource name of those GPUs."),
    *[_finetune_param(p) for p in knob_params(FinetuneConfig, "finetune_")
      if p.name not in ("finetune_experiment", "finetune_model")],
    Param.from_field(FinetuneConfig, "lrs", "scratch_lrs",
                     description="Learning rates of the scratch baseline (the same tower from "
                     "random initialisation, trained on the same k-shot splits with the "
                     "finetune_ settings), chosen on the validation split; empty: the preset's "
                     "grid for scratch."),
    Param.from_field(CorruptConfig, "corruptions", "ood_suite_corruptions"),
    Param.from_field(CorruptConfig, "severities", "ood_suite_severities"),
    *[p for p in knob_params(EvaluateConfig, "evaluate_") if p.name != "evaluate_experiment"],
    *[p for p in knob_params(ReportConfig, "report_")
      if p.name not in ("report_experiment", "report_group")],
]


def _stage_args(p: Any, prefix: str, config: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    names = [n for n in config.knob_fields() if n != "experiment" and n not in skip]
    return {n: getattr(p, prefix + n) for n in names}


def _with_cluster_env(task: Any) -> Any:
    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=SECRET_ENV)
    kubernetes.use_config_map_as_env(
        task, config_map_name=SETTINGS_CONFIG_MAP, config_map_key_to_env=SETTINGS_ENV
    )
    return task


def _build(p: Any) -> Any:
    group = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
    data = {f: getattr(p, name) for f, name in SHARED_DATA.items()}
    data.update(data_root=p.data_root, experiment=p.experiment, run_group=group)
    pre_data = shard_op(
        split="train",
        **{f: getattr(p, "pretrain_data_" + f) for f in PRETRAIN_DATA_FIELDS},
        **data,
    ).set_display_name("shard pre-training data")
    train_data = shard_op(
        source=p.downstream_source,
        split="train",
        kshot=p.downstream_kshot,
        kshot_trials=p.downstream_kshot_trials,
        **data,
    ).set_display_name("shard downstream train")
    id_data = shard_op(source=p.downstream_source, split="test", **data).set_display_name(
        "shard ID test"
    )
    ood_data = shard_op(
        source=p.downstream_source,
        split="test",
        corruption=p.ood_corruption,
        severity=p.ood_severity,
        **data,
    ).set_display_name("shard OOD test")
    pretrained = pretrain_op(
        data=pre_data.outputs["dataset"],
        work_root=p.work_root,
        experiment=p.experiment,
        run_group=group,
        **_stage_args(p, "pretrain_", PretrainConfig),
    ).set_display_name("pretrain")
    # torchrun runs inside this one pod, over its GPUs; DataLoader workers pass batches through
    # /dev/shm, which a container gets only 64 MB of unless given a memory-backed volume.
    pretrained.set_accelerator_type(p.pretrain_accelerator).set_accelerator_limit(p.pretrain_gpus)
    kubernetes.empty_dir_mount(pretrained, volume_name="dshm", mount_path="/dev/shm",
                               medium="Memory")
    suite = corrupt_op(
        data=id_data.outputs["dataset"],
        corruptions=p.ood_suite_corruptions,
        severities=p.ood_suite_severities,
        seed=p.data_seed,
        workers=p.data_workers,
        data_root=p.data_root,
        experiment=p.experiment,
        run_group=group,
    ).set_display_name("corruption suite")
    finetune_knobs = _stage_args(p, "finetune_", FinetuneConfig, skip=("model",))
    finetuned = finetune_op(
        pretrained=pretrained.outputs["checkpoint"],
        data=train_data.outputs["dataset"],
        work_root=p.work_root,
        experiment=p.experiment,
        run_group=group,
        model="",
        **finetune_knobs,
    ).set_display_name("finetune grid")
    scratch_knobs = {k: v for k, v in finetune_knobs.items() if k not in ("modes", "lrs")}
    scratched = scratch_op(
        data=train_data.outputs["dataset"],
        work_root=p.work_root,
        experiment=p.experiment,
        run_group=group,
        model=p.pretrain_model,
        lrs=p.scratch_lrs,
        **(scratch_knobs | {"batchnorm": "preset"}),
    ).set_display_name("scratch baseline")
    evaluations = [
        evaluate_op(
            model=grid.outputs["finetuned"],
            id_data=id_data.outputs["dataset"],
            ood_data=ood_data.outputs["dataset"],
            ood_suite=suite.outputs["suite"],
            work_root=p.work_root,
            experiment=p.experiment,
            run_group=group,
            **_stage_args(p, "evaluate_", EvaluateConfig),
        ).set_display_name(name)
        for grid, name in ((finetuned, "evaluate"), (scratched, "evaluate scratch"))
    ]
    reported = report_op(
        work_root=p.work_root,
        experiment=p.experiment,
        run_group=group,
        **_stage_args(p, "report_", ReportConfig, skip=("group",)),
    ).set_display_name("report")
    reported.after(*evaluations)  # it reads their MLflow runs, not their artifacts
    for task in (pre_data, train_data, id_data, ood_data, suite, pretrained, finetuned,
                 scratched, *evaluations, reported):
        _with_cluster_env(task)
    return evaluations[0].outputs["metrics"]


transfer = dsl.pipeline(
    name="transfer",
    description="Pre-train on one source; fine-tune a grid of modes, k shots, seeds and "
    "learning rates beside a scratch baseline; evaluate ID, OOD and under corruption; report.",
)(
    pipeline_function(
        "transfer", PARAMS, _build, " ".join(__doc__.strip().split("\n\n")[0].split()),
        returns="Metrics",
    )
)


def stage_configs(values: dict[str, Any]) -> list[Any]:
    """The stage configs a run with these parameter values will use (wiring left blank).

    ``upstream run`` validates them before starting anything, so that a bad value is a
    one-line error naming the parameter instead of a failed pipeline step minutes later.
    """
    v = {p.name: p.default for p in PARAMS} | values
    if not isinstance(v["pretrain_gpus"], int) or v["pretrain_gpus"] < 0:
        raise UpstreamError(f"invalid pretrain_gpus: must be an integer ≥ 0 "
                            f"(got {v['pretrain_gpus']!r})")
    data = {f: v[name] for f, name in SHARED_DATA.items()} | {"experiment": v["experiment"]}
    shards = [
        ShardConfig.parse(split="train",
                          **{f: v["pretrain_data_" + f] for f in PRETRAIN_DATA_FIELDS}, **data),
        ShardConfig.parse(source=v["downstream_source"], split="train",
                          kshot=v["downstream_kshot"], kshot_trials=v["downstream_kshot_trials"],
                          **data),
        ShardConfig.parse(source=v["downstream_source"], split="test",
                          corruption=v["ood_corruption"], severity=v["ood_severity"], **data),
    ]

    def stage(config: type, prefix: str, skip: tuple[str, ...] = (), **wiring: Any) -> Any:
        knobs = {n: v[prefix + n] for n in config.knob_fields()
                 if n != "experiment" and n not in skip}
        return config.parse(**(knobs | wiring), experiment=v["experiment"])

    return [
        *shards,
        CorruptConfig.parse(data="-", corruptions=v["ood_suite_corruptions"],
                            severities=v["ood_suite_severities"], seed=v["data_seed"],
                            experiment=v["experiment"]),
        stage(PretrainConfig, "pretrain_", data="-"),
        stage(FinetuneConfig, "finetune_", skip=("model",), pretrained="-", data="-"),
        stage(FinetuneConfig, "finetune_", skip=("model",), data="-", modes="scratch",
              model=v["pretrain_model"], lrs=v["scratch_lrs"], batchnorm="preset"),
        stage(EvaluateConfig, "evaluate_", model="-", id_data="-", ood_data="-"),
        stage(ReportConfig, "report_", skip=("group",)),
    ]


def check_shots(configs: list[Any]) -> None:
    """Each fine-tuning step's k (plus its validation examples) against the smallest class of
    the downstream training set, before anything runs: the check the finetune step makes on
    its manifest, over the shard plan instead (as the study's ``plan.check_sizes`` does), so
    that a k too large fails in seconds rather than after the data and pre-training steps.
    ``configs`` are :func:`stage_configs`'; sources that are not cheap to open are left to
    the step."""
    from upstream.data.sources import parse_sources
    from upstream.finetune.splits import check_sizes
    from upstream.shards.stage import planned_class_counts
    from upstream.study.plan import cheap_sources

    train = configs[1]  # stage_configs' order: pre-training data, downstream train, ...
    if not all(spec.kind in cheap_sources() for spec in parse_sources(train.source)):
        return
    counts = planned_class_counts(train)
    for config in configs:
        if not isinstance(config, FinetuneConfig):
            continue
        try:
            check_sizes(counts, config.shot_list, config.val_per_class,
                        f"downstream_source {train.source} (train)")
        except UpstreamError as e:
            raise UpstreamError(
                f"invalid finetune_shots={config.shots} (with finetune_val_per_class="
                f"{config.val_per_class}): {str(e).removeprefix('finetune: ')}"
            ) from None
