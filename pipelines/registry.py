"""The pipelines upstream knows by name (for ``upstream compile`` and ``upstream run``)."""

from __future__ import annotations

from typing import Any

from upstream.components.factory import Param


def pipelines() -> dict[str, tuple[Any, list[Param]]]:
    """name → (the @dsl.pipeline object, its parameters)."""
    from upstream.pipelines import study, transfer

    return {"transfer": (transfer.transfer, transfer.PARAMS),
            "study": (study.study, study.PARAMS)}


def stage_configs(name: str, values: dict[str, Any]) -> list[Any]:
    """Validate a run's parameter values: the stage configs it will use."""
    from upstream.pipelines import study, transfer

    return {"transfer": transfer.stage_configs, "study": study.stage_configs}[name](values)
