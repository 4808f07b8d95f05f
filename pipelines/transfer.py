"""The ``transfer`` pipeline: shard → pretrain → finetune → evaluate.

Four shard steps make the pre-training set, the downstream training set, the in-distribution
test set and its corrupted out-of-distribution copy; one model is pre-trained, fine-tuned with
LP-FT on k shots per class and evaluated on both test sets. Every parameter takes its type,
default and description from a stage config model; the few that set the same field of several
steps (image size, data seed, experiment) are shared.
"""

from __future__ import annotations

from typing import Any

from kfp import dsl, kubernetes

from upstream.components.factory import Param, knob_params, pipeline_function
from upstream.components.stages import (
    DATA_ROOT,
    WORK_ROOT,
    evaluate_op,
    finetune_op,
    pretrain_op,
    shard_op,
)
from upstream.errors import UpstreamError
from upstream.evaluate import EvaluateConfig
from upstream.finetune import FinetuneConfig
from upstream.pretrain import PretrainConfig
from upstream.shard import ShardConfig

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
    *[p for p in knob_params(FinetuneConfig, "finetune_") if p.name != "finetune_experiment"],
    *[p for p in knob_params(EvaluateConfig, "evaluate_") if p.name != "evaluate_experiment"],
]


def _stage_args(p: Any, prefix: str, config: type) -> dict[str, Any]:
    names = [n for n in config.knob_fields() if n != "experiment"]
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
    finetuned = finetune_op(
        pretrained=pretrained.outputs["checkpoint"],
        data=train_data.outputs["dataset"],
        work_root=p.work_root,
        experiment=p.experiment,
        run_group=group,
        **_stage_args(p, "finetune_", FinetuneConfig),
    ).set_display_name("finetune")
    evaluated = evaluate_op(
        model=finetuned.outputs["finetuned"],
        id_data=id_data.outputs["dataset"],
        ood_data=ood_data.outputs["dataset"],
        experiment=p.experiment,
        run_group=group,
        **_stage_args(p, "evaluate_", EvaluateConfig),
    ).set_display_name("evaluate")
    for task in (pre_data, train_data, id_data, ood_data, pretrained, finetuned, evaluated):
        _with_cluster_env(task)
    return evaluated.outputs["metrics"]


transfer = dsl.pipeline(
    name="transfer",
    description="Pre-train on one source, fine-tune with LP-FT on k shots, evaluate ID and OOD.",
)(
    pipeline_function(
        "transfer", PARAMS, _build, __doc__.strip().split("\n\n")[0], returns="Metrics"
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

    def stage(config: type, prefix: str, **wiring: str) -> Any:
        knobs = {n: v[prefix + n] for n in config.knob_fields() if n != "experiment"}
        return config.parse(**knobs, experiment=v["experiment"], **wiring)

    return [
        *shards,
        stage(PretrainConfig, "pretrain_", data="-"),
        stage(FinetuneConfig, "finetune_", pretrained="-", data="-"),
        stage(EvaluateConfig, "evaluate_", model="-", id_data="-", ood_data="-"),
    ]
