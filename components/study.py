"""The components of the ``study`` pipeline: a plan step per level, one step per unit, the report.

A study's grid is only known when the run starts (the spec is a run parameter), so its steps
cannot take one parameter per knob as the stage components do. A plan step expands the spec
(:mod:`upstream.study.plan`) into the level's units; each unit step takes one unit's complete
stage config as a JSON string and runs that stage. JSON strings rather than dicts: the local
runner turns ints inside lists and dicts into floats, and a dict key called ``name``
misbehaves. A unit step's cache key is then its own config: a unit shared by two studies, or
finished before a run was killed, is a cache hit (and, without the cache, a no-op at its
content-addressed output).
"""

# No `from __future__ import annotations`: KFP reads these annotations as types.
from typing import List  # noqa: UP035 - KFP reads the annotation of the component source

from kfp import dsl
from kfp.dsl import HTML, Markdown, Output

from upstream.components.factory import BASE_IMAGE

_component = dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)


@_component
def study_plan(spec: str, level: str, data_root: str, work_root: str,
               after: List[str], also_after: List[str]) -> List[dict]:  # noqa: UP006
    """Expand a study spec into the units of one level (shard, corrupt, pretrain, transfer).

    Args:
        spec: The study spec: YAML text, or the path or s3:// URI of a .yaml file.
        level: Which level's units to list.
        data_root: Where shards go.
        work_root: Where models, evaluations and reports go.
        after: Outputs of a level before (only for order).
        also_after: Outputs of another level before (only for order).
    """
    from upstream.components.glue import run_study_plan

    return run_study_plan(spec, level, data_root, work_root)


@_component
def study_shard(unit: str, run_group: str) -> str:
    """Shard one data set of the study (a no-op when its output is complete).

    Args:
        unit: The shard config, as JSON.
        run_group: The study's name (the runs' upstream.group tag).
    """
    from upstream.components.glue import run_study_unit

    return run_study_unit("shard", unit, run_group)


@_component
def study_corrupt(unit: str, run_group: str) -> str:
    """Make one corruption suite of the study.

    Args:
        unit: The corrupt config, as JSON.
        run_group: The study's name (the runs' upstream.group tag).
    """
    from upstream.components.glue import run_study_unit

    return run_study_unit("corrupt", unit, run_group)


@_component
def study_pretrain(unit: str, run_group: str, gpus: int, accelerator: str,
                   plots: Output[HTML]) -> str:
    """Pre-train one (source, method, tower, budget) of the study.

    Args:
        unit: The pretrain config, as JSON.
        run_group: The study's name (the runs' upstream.group tag).
        gpus: GPUs the step requests (as its resource limit; passed in so that the loop
            receives the value).
        accelerator: Kubernetes resource name of those GPUs.
    """
    from upstream.components.glue import run_study_unit

    return run_study_unit("pretrain", unit, run_group, plots)


@_component
def study_finetune(unit: str, run_group: str, plots: Output[HTML]) -> str:
    """Run one fine-tuning grid of the study (a pre-trained model or scratch, one set).

    Args:
        unit: The finetune config, as JSON.
        run_group: The study's name (the runs' upstream.group tag).
    """
    from upstream.components.glue import run_study_unit

    return run_study_unit("finetune", unit, run_group, plots)


@_component
def study_evaluate(unit: str, run_group: str, finetuned: str, plots: Output[HTML]) -> str:
    """Evaluate one fine-tuning grid of the study on its ID and OOD sets.

    Args:
        unit: The evaluate config, as JSON.
        run_group: The study's name (the runs' upstream.group tag).
        finetuned: The grid's output (the step before; must be the config's model).
    """
    from upstream.components.glue import run_study_unit

    return run_study_unit("evaluate", unit, run_group, plots, expect_model=finetuned)


@_component
def study_report(spec: str, data_root: str, work_root: str, evaluations: List[str],  # noqa: UP006
                 report: Output[HTML], summary: Output[Markdown]) -> str:
    """The study's report over every evaluation: figures, effective robustness, significance.

    Args:
        spec: The study spec (YAML text or a .yaml file's path or URI).
        data_root: Where shards go.
        work_root: Where models, evaluations and reports go.
        evaluations: Every evaluation's output.
    """
    from upstream.components.glue import run_study_report

    return run_study_report(spec, data_root, work_root, evaluations, report, summary)
