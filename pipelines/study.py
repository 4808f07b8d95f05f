"""The ``study`` pipeline: any study spec, run once per unit of work, then one report.

The spec is a run parameter (YAML text, or a .yaml file's path or ``s3://`` URI), so the
Kubeflow UI's run form takes a whole study. A plan step expands it level by level
(:mod:`upstream.study.plan`) and a ``dsl.ParallelFor`` runs each level's units: every data set
is sharded once (pre-training sources, downstream train and test splits, corrupted copies),
then the corruption suites are made and every (source, method, tower, budget) is pre-trained
once, then each (pre-trained model or scratch tower, downstream set) is fine-tuned over the grid
and evaluated in one loop iteration, and a report step reads every evaluation.

Fan-in is ``dsl.Collected``: each level's plan step collects the outputs of the level before
(which orders the levels) and the report step collects every evaluation's output, whose
``evaluation.json`` lists its MLflow model runs. It is chosen over reading MLflow by the run's
tag because a unit another run already finished (a cache hit, or a no-op at its
content-addressed output) logs no new runs under this run's tag, yet belongs in this study's
report. Collected needs a Kubeflow Pipelines backend ≥ 2.5.

Caching is on for every step but the report: a step's inputs are its unit's whole config, so a
re-run, a resumed run or another study with the same unit hits the cache; with caching off,
the unit finds its output complete and does nothing.
"""

from __future__ import annotations

from typing import Any

from kfp import dsl, kubernetes

from upstream.components.factory import Param, pipeline_function
from upstream.components.stages import DATA_ROOT, WORK_ROOT
from upstream.components.study import (
    study_corrupt,
    study_evaluate,
    study_finetune,
    study_plan,
    study_pretrain,
    study_report,
    study_shard,
)
from upstream.pipelines.transfer import _with_cluster_env
from upstream.study import plan as study_plan_mod
from upstream.study import spec as study_spec

#: Iterations of a level that run at once on a cluster (the local runner runs 2).
PARALLELISM = 16

PARAMS: list[Param] = [
    # A name, not the spec's text: kfp 2.17 writes a multi-line default into the compiled
    # file's header comment unescaped, which breaks the YAML.
    Param("spec", str, "entezari-mini",
          "The study spec: a shipped study's name (entezari-mini, ramanujan-mini), YAML text "
          "(a whole spec, as in studies/), or the path or s3:// URI of a .yaml file every "
          "step can read."),
    DATA_ROOT,
    WORK_ROOT,
    Param("pretrain_gpus", int, 0, "GPUs each pre-training step requests (0: none); set the "
          "spec's pretrain.procs_per_node to the same number to train on all of them."),
    Param("pretrain_accelerator", str, "nvidia.com/gpu",
          "Kubernetes resource name of those GPUs."),
]


def _build(p: object) -> None:
    roots = {"spec": p.spec, "data_root": p.data_root, "work_root": p.work_root}  # type: ignore[attr-defined]
    tasks = []

    def plan(level: str, after: object, also_after: object = ()) -> dsl.PipelineTask:
        task = study_plan(level=level, after=after, also_after=also_after or [],
                          **roots).set_display_name(f"plan {level}")
        tasks.append(task)
        return task

    shard_plan = plan("shard", [])
    with dsl.ParallelFor(shard_plan.output, parallelism=PARALLELISM) as unit:
        sharded = study_shard(unit=unit.config, run_group=unit.group).set_display_name("shard")
        tasks.append(sharded)
    # One Collected per consumer: kfp 2.17's compiler fails on a Collected used twice.
    corrupt_plan = plan("corrupt", dsl.Collected(sharded.output))
    with dsl.ParallelFor(corrupt_plan.output, parallelism=PARALLELISM) as unit:
        suite = study_corrupt(unit=unit.config, run_group=unit.group).set_display_name(
            "corruption suite")
        tasks.append(suite)

    pretrain_plan = plan("pretrain", dsl.Collected(sharded.output))
    with dsl.ParallelFor(pretrain_plan.output, parallelism=PARALLELISM) as unit:
        # The GPU settings are also inputs: kfp.local hands a loop only the pipeline parameters
        # its tasks take as inputs, and a resource limit alone does not count.
        pretrained = study_pretrain(unit=unit.config, run_group=unit.group,
                                    gpus=p.pretrain_gpus,  # type: ignore[attr-defined]
                                    accelerator=p.pretrain_accelerator,  # type: ignore[attr-defined]
                                    ).set_display_name("pretrain")
        pretrained.set_accelerator_type(p.pretrain_accelerator).set_accelerator_limit(  # type: ignore[attr-defined]
            p.pretrain_gpus)  # type: ignore[attr-defined]
        # DataLoader workers pass batches through /dev/shm (64 MB in a container by default).
        kubernetes.empty_dir_mount(pretrained, volume_name="dshm", mount_path="/dev/shm",
                                   medium="Memory")
        tasks.append(pretrained)

    transfer_plan = plan("transfer", dsl.Collected(pretrained.outputs["Output"]),
                         dsl.Collected(suite.output))
    with dsl.ParallelFor(transfer_plan.output, parallelism=PARALLELISM) as unit:
        finetuned = study_finetune(unit=unit.finetune, run_group=unit.group).set_display_name(
            "finetune grid")
        evaluated = study_evaluate(unit=unit.evaluate, run_group=unit.group,
                                   finetuned=finetuned.outputs["Output"]).set_display_name("evaluate")
        tasks += [finetuned, evaluated]

    reported = study_report(evaluations=dsl.Collected(evaluated.outputs["Output"]), **roots)
    reported.set_display_name("report").set_caching_options(False)
    tasks.append(reported)
    for task in tasks:
        _with_cluster_env(task)


study = dsl.pipeline(
    name="study",
    description="Run a study spec: shard every source and downstream set once, pre-train "
    "every (source, method, tower, budget) once, fine-tune and evaluate every pre-trained "
    "model and the scratch baseline on every downstream set, report.",
)(pipeline_function("study", PARAMS, _build,
                    " ".join(__doc__.strip().split("\n\n")[0].split())))


def stage_configs(values: dict[str, Any]) -> list[Any]:
    """Every unit's stage config for a run with these values (the spec validated, every cheap
    source opened and each k checked against its downstream set's smallest class)."""
    v = {p.name: p.default for p in PARAMS} | values
    if not isinstance(v["pretrain_gpus"], int) or v["pretrain_gpus"] < 0:
        from upstream.errors import UpstreamError

        raise UpstreamError(f"invalid pretrain_gpus: must be an integer ≥ 0 "
                            f"(got {v['pretrain_gpus']!r})")
    spec, text = study_spec.load(v["spec"])
    plan = study_plan_mod.build(spec, v["data_root"], v["work_root"], text)
    study_plan_mod.check_sizes(plan, text)
    return [u.config for kind in study_plan_mod.KINDS for u in plan.units[kind]]
