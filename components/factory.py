"""Kubeflow components and pipeline parameters derived from the stage config models.

A lightweight KFP component is a Python function whose signature becomes the component's
inputs and whose source is shipped in the compiled YAML. Rather than writing each stage's
knobs a second time as a function signature, :func:`stage_component` *generates* that
function's source from the stage's config model: one parameter per knob (type, default and
description from the pydantic field), plus the artifact inputs and outputs. The generated body
only forwards its arguments to a hand-written glue function in :mod:`upstream.components.glue`
that runs inside the container. The same generator builds pipeline functions whose parameters
are taken from config fields (:class:`Param`).
"""

from __future__ import annotations

import dataclasses
import linecache
import os
import typing
from collections.abc import Callable, Sequence
from typing import Any

from kfp import dsl
from pydantic.fields import FieldInfo

from upstream.config import StageConfig, literal_choices

#: The image every component runs in (upstream installed; see images/Dockerfile), unless
#: ``UPSTREAM_IMAGE`` names another when the components are defined (``upstream compile --image``).
DEFAULT_IMAGE = "ghcr.io/upstream-ml/upstream:0.1.0"
BASE_IMAGE = os.environ.get("UPSTREAM_IMAGE") or DEFAULT_IMAGE

_KFP_NAMES: dict[str, Any] = {
    name: getattr(dsl, name)
    for name in (
        "Input", "Output", "Dataset", "Model", "Metrics", "ClassificationMetrics", "HTML",
        "Markdown", "Artifact",
    )
}


def kfp_type(field: FieldInfo) -> type:
    """The KFP parameter type for a config field (Literals become their value type)."""
    ann = field.annotation
    choices = literal_choices(ann)
    if choices is not None:
        return type(choices[0])
    if ann in (str, int, float, bool):
        return ann  # type: ignore[return-value]
    origin = typing.get_origin(ann)
    if origin in (list, dict):
        return origin
    raise TypeError(f"config field type {ann!r} has no KFP parameter type")


def describe(field: FieldInfo) -> str:
    text = (field.description or "").strip()
    choices = literal_choices(field.annotation)
    if choices is not None:
        text += f" One of: {', '.join(map(str, choices))}."
    return " ".join(text.split())


@dataclasses.dataclass(frozen=True)
class Param:
    """A function parameter: its name, type, default and description."""

    name: str
    type: type
    default: Any
    description: str

    @classmethod
    def from_field(
        cls, config: type[StageConfig], field: str, name: str | None = None, **override: Any
    ) -> Param:
        """A parameter taking its type, default and description from ``config.field``."""
        info = config.model_fields[field]
        return cls(
            name=name or field,
            type=kfp_type(info),
            default=override.get("default", info.default),
            description=override.get("description", describe(info)),
        )


def knob_params(config: type[StageConfig], prefix: str = "") -> list[Param]:
    """One parameter per knob of ``config``, optionally prefixed (``pretrain_lr``)."""
    return [Param.from_field(config, f, name=prefix + f) for f in config.knob_fields()]


def _annotation(tp: Any) -> str:
    if isinstance(tp, str):
        return tp
    return tp.__name__


def render_function(
    name: str,
    params: Sequence[Param],
    artifacts: Sequence[tuple[str, str]],
    doc: str,
    body: str,
    returns: str = "",
) -> str:
    """Python source of a function: artifacts first, then parameters with their defaults."""
    args = [f"    {a}: {ann}," for a, ann in artifacts]
    args += [f"    {p.name}: {_annotation(p.type)} = {p.default!r}," for p in params]
    lines = [doc.strip(), "", "Args:"]
    for p in params:
        lines.append(f"    {p.name}: {p.description}")
    docstring = "\n".join("    " + ln if ln else "" for ln in lines)
    ret = f" -> {returns}" if returns else ""
    head = f"def {name}(\n" + "\n".join(args) + f"\n){ret}:\n"
    return head + f'    """\n{docstring}\n    """\n{body}\n'


def define(source: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """Execute generated source so that ``inspect.getsource`` (which KFP uses) finds it."""
    filename = f"<upstream-generated-{name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    ns: dict[str, Any] = {"__name__": __name__, **_KFP_NAMES, **namespace}
    exec(compile(source, filename, "exec", dont_inherit=True), ns)  # noqa: S102 - our own generated code
    return ns[name]


def stage_component(
    config: type[StageConfig],
    glue: str,
    artifacts: Sequence[tuple[str, str]],
    extra: Sequence[Param] = (),
    cpu: str | None = None,
    memory: str | None = None,
    name: str = "",
    drop: Sequence[str] = (),
) -> Any:
    """A lightweight KFP component for one stage, its parameters derived from ``config``.

    ``glue`` names the function in :mod:`upstream.components.glue` that maps the component's
    artifacts to the stage's wiring fields and calls the stage. ``name``: the component's
    name (default: the stage's); ``drop``: knobs the glue sets itself (not parameters).
    """
    params = [p for p in knob_params(config) if p.name not in drop] + list(extra)
    import sys

    module_doc = sys.modules[config.__module__].__doc__ or f"The {config.stage} stage."
    # One line: KFP's docstring parser loses the Args section after a wrapped summary.
    doc = " ".join(module_doc.strip().split("\n\n")[0].split())
    body = (
        "    arguments = dict(locals())\n"
        f"    from upstream.components.glue import {glue}\n"
        f"    {glue}(**arguments)"
    )
    name = name or config.stage
    source = render_function(name, params, artifacts, doc, body)
    func = define(source, name, {})
    return dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)(func)


def pipeline_function(
    name: str, params: Sequence[Param], build: Callable[[Any], Any], doc: str, returns: str = ""
) -> Callable[..., Any]:
    """A pipeline function with ``params`` as its signature; ``build`` gets them as attributes."""
    body = "    return _build(_Namespace(**locals()))"
    source = render_function(name, params, [], doc, body, returns)
    import types

    return define(source, name, {"_build": build, "_Namespace": types.SimpleNamespace})
