"""The base of every stage's config model and what is derived from it.

Each stage has one pydantic model. From it come the CLI options (``upstream.cli``), the
Kubeflow component signature and the pipeline parameters (``upstream.components``), and the
MLflow params (``StageConfig.mlflow_params``). A field marked ``wiring`` is an input or output
location that the pipeline connects itself: it is a CLI option but not a pipeline parameter.
"""

from __future__ import annotations

import hashlib
import json
import typing
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from upstream.errors import UpstreamError


def wiring(default: Any = ..., description: str = "") -> Any:
    """A field the pipeline connects (a data or model location), not a user knob."""
    return Field(default, description=description, json_schema_extra={"wiring": True})


class StageConfig(BaseModel):
    """Common behaviour of the stage configs: strict fields, hashing, MLflow params."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    stage: ClassVar[str] = ""
    #: Fields that change how a stage runs but not what it makes (workers, checkpoint
    #: frequency, ...): left out of the fingerprint, so its output location stays put.
    not_decisive: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def parse(cls, **values: Any) -> typing.Self:
        """Validate ``values``; raise :class:`UpstreamError` naming the first bad field."""
        try:
            return cls(**values)
        except ValidationError as e:
            raise UpstreamError(describe_validation_error(cls, e)) from None

    @classmethod
    def knob_fields(cls) -> dict[str, Any]:
        """Fields a user sets (pipeline parameters): every field that is not wiring."""
        return {
            name: f
            for name, f in cls.model_fields.items()
            if not (f.json_schema_extra or {}).get("wiring")
        }

    def knobs(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.knob_fields()}

    def fingerprint(self) -> str:
        """A short stable hash of the config, for content-addressed output locations."""
        blob = json.dumps(self.model_dump(mode="json", exclude=set(self.not_decisive)),
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def mlflow_params(self) -> dict[str, str]:
        """Every field, flattened to strings as MLflow params (``stage.field``)."""
        out: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            text = value if isinstance(value, str) else json.dumps(value)
            out[f"{self.stage}.{name}"] = text[:6000]
        return out


def describe_validation_error(cls: type[BaseModel], e: ValidationError) -> str:
    err = e.errors()[0]
    field = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown option"
    value = err.get("input")
    shown = f" (got {value!r})" if err["type"] != "missing" and not isinstance(value, dict) else ""
    stage = getattr(cls, "stage", "") or cls.__name__
    if not field:  # a check across fields: its message names them
        return f"{stage}: {msg}"
    return f"{stage}: invalid {field}: {msg}{shown}"


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` → ``["a", "b", "c"]``: the comma lists of list-valued fields.

    List-valued knobs are comma-separated strings rather than lists: one type for the CLI
    (``--shots 1,5,10,0``), KFP parameters (the local runner turns ints inside lists into
    floats) and MLflow params.
    """
    return [part.strip() for part in text.split(",") if part.strip()]


def literal_choices(annotation: Any) -> tuple[str, ...] | None:
    """The allowed values of a ``Literal[...]`` annotation, else None."""
    if typing.get_origin(annotation) is Literal:
        return tuple(typing.get_args(annotation))
    return None
