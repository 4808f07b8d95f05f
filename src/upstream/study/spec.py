"""The study spec: one YAML file that names a whole grid of pre-training and transfer.

A study is named pre-training sources (each a shard configuration with its interventions) ×
methods × towers × budgets, and downstream sets (each with its ID test set and OOD sets: a
corrupted copy of the test set, or ImageNet-C's suite), fine-tuned over modes × shots × seeds ×
learning rates beside the scratch baseline, evaluated, and reported with effective robustness
and significance tests. Example (``studies/entezari-mini.yaml`` is a full one)::

    name: my-study
    sources:
      fractals: {source: fractals, num_classes: 10, samples_per_class: 200}
      shapes: {source: shapes}
    methods: [clip, supervised]
    downstream:
      digits:
        source: digits
        ood:
          mixed: {corruption: mixed, severity: 3}
          corruptions: {suite: {severities: "1,3,5"}}
    finetune: {modes: "lp,lp-ft", shots: "1,5,10,0", seeds: "0,1,2"}
    report: {compare: "scratch,source,method"}

Every section is built from a stage config model (:func:`section`): a field keeps the stage's
name, type, default and description, so the spec is the stages' knobs, not a second copy of
them. The stage configs' own checks run when the spec is expanded into units
(:mod:`upstream.study.plan`), and their errors are reported with the spec path that set the
value. Errors name the field's path and, where the YAML parser knows it, the line.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from upstream.config import split_list
from upstream.errors import UpstreamError
from upstream.evaluate import CorruptConfig, EvaluateConfig
from upstream.finetune import FinetuneConfig
from upstream.pretrain import PretrainConfig
from upstream.report import ReportConfig
from upstream.shards.stage import Corruption, ShardConfig

#: Shard fields set once for every data unit of a study (``data:``).
DATA_FIELDS = ("image_size", "resize", "image_format", "jpeg_quality", "seed", "workers")
#: Shard fields the study sets per unit itself.
_SHARD_PER_UNIT = {"split", "corruption", "severity", "kshot", "kshot_trials", "experiment",
                   "output"}
SOURCE_FIELDS = tuple(f for f in ShardConfig.knob_fields()
                      if f not in DATA_FIELDS and f not in _SHARD_PER_UNIT)
#: Pre-training fields that form the grid (methods, towers, budgets) or that the study sets.
BUDGET_FIELDS = ("epochs", "train_samples")
_PRETRAIN_GRID = {"method", "model", "source_name", "experiment", "registered_model",
                  *BUDGET_FIELDS}
PRETRAIN_FIELDS = tuple(f for f in PretrainConfig.knob_fields() if f not in _PRETRAIN_GRID)
FINETUNE_FIELDS = tuple(f for f in FinetuneConfig.knob_fields()
                        if f not in ("model", "experiment"))
EVALUATE_FIELDS = tuple(f for f in EvaluateConfig.knob_fields() if f != "experiment")
REPORT_FIELDS = tuple(f for f in ReportConfig.knob_fields() if f not in ("experiment", "group"))
METHODS: tuple[str, ...] = tuple(PretrainConfig.model_fields["method"].annotation.__args__)

_FORBID = ConfigDict(extra="forbid")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"


def section(name: str, config: type[BaseModel], fields: tuple[str, ...], doc: str,
            optional: bool = False, **extra: Any) -> type[BaseModel]:
    """A spec section made of ``config``'s ``fields`` (name, type, default, description).

    ``optional``: every field defaults to None (an override of another section's value).
    """
    defs: dict[str, Any] = {}
    for f in fields:
        info = config.model_fields[f]
        copied = info._copy() if hasattr(info, "_copy") else info.model_copy()  # pydantic ≥2.11
        if optional:
            copied.default = None
            defs[f] = (info.annotation | None, copied)
        else:
            defs[f] = (info.annotation, copied)
    defs.update(extra)
    return create_model(name, __config__=_FORBID, __doc__=doc, **defs)


DataSettings = section("DataSettings", ShardConfig, DATA_FIELDS,
                       "Shard settings of every data unit: image size and encoding, data seed.")
SourceSpec = section("SourceSpec", ShardConfig, SOURCE_FIELDS,
                     "A pre-training source: the shard configuration (train split) with its "
                     "interventions.")
TestSpec = section("TestSpec", ShardConfig, SOURCE_FIELDS,
                   "Overrides of the downstream set's shard settings for its ID test split "
                   "(e.g. another source holding the test images).", optional=True)
SuiteSpec = section("SuiteSpec", CorruptConfig, ("corruptions", "severities"),
                    "ImageNet-C's corruption suite of the ID test set.")
BudgetSpec = section("BudgetSpec", PretrainConfig, BUDGET_FIELDS,
                     "A pre-training budget: epochs, or samples seen.")
PretrainSettings = section("PretrainSettings", PretrainConfig, PRETRAIN_FIELDS,
                           "Pre-training settings shared by every (source, method, tower, "
                           "budget) unit.")
FinetuneSettings = section("FinetuneSettings", FinetuneConfig, FINETUNE_FIELDS,
                           "The fine-tuning grid of every (pre-trained model, downstream set).")
EvaluateSettings = section("EvaluateSettings", EvaluateConfig, EVALUATE_FIELDS,
                           "Evaluation settings.")
ReportSettings = section("ReportSettings", ReportConfig, REPORT_FIELDS,
                         "The report over every model of the study: the baseline family of "
                         "effective robustness (baseline) and the comparisons to test "
                         "(compare).")


class OodSpec(BaseModel):
    """One OOD set of a downstream set: a corrupted copy of its test split, or the suite."""

    model_config = _FORBID
    corruption: Corruption | None = Field(
        None, description=ShardConfig.model_fields["corruption"].description)
    severity: int = Field(3, ge=1, le=5,
                          description=ShardConfig.model_fields["severity"].description)
    suite: SuiteSpec | None = Field(None, description=SuiteSpec.__doc__)  # type: ignore[valid-type]

    @model_validator(mode="after")
    def _one_kind(self) -> OodSpec:
        if (self.corruption is None) == (self.suite is None):
            raise ValueError("give either corruption (a corrupted copy of the test split) or "
                             "suite (ImageNet-C's corruption suite)")
        return self


_DownstreamBase = section("_DownstreamBase", ShardConfig, SOURCE_FIELDS, "")


class DownstreamSpec(_DownstreamBase):  # type: ignore[misc, valid-type]
    """A downstream set: its shard configuration (the train split is fine-tuned on, the test
    split is the ID test set), test-split overrides, and its OOD sets by name."""

    test: TestSpec = Field(default_factory=TestSpec,  # type: ignore[valid-type]
                           description=TestSpec.__doc__)
    ood: dict[str, OodSpec] = Field(default_factory=dict,
                                    description="OOD sets by name (used in metric names).")


class ScratchSpec(BaseModel):
    """The scratch baseline: each tower trained from random initialisation on the same k-shot
    splits, with the fine-tuning settings; the learning rates are its own."""

    model_config = _FORBID
    lrs: str = Field("", description=FinetuneConfig.model_fields["lrs"].description)


class StudySpec(BaseModel):
    """A whole study: what a ``study`` pipeline run (or ``upstream run study``) runs."""

    model_config = _FORBID
    name: str = Field(description="The study's name: its MLflow run group and report folder.",
                      pattern=rf"^{_NAME}$", max_length=64)
    description: str = Field("", description="What the study asks, for the report's reader.")
    experiment: str = Field("", description="MLflow experiment of every run (default: the "
                            "study's name).")
    data: DataSettings = Field(default_factory=DataSettings,  # type: ignore[valid-type]
                               description=DataSettings.__doc__)
    sources: dict[str, SourceSpec] = Field(  # type: ignore[valid-type]
        description="Pre-training sources by name (the name is the source in every report).")
    methods: list[Literal[METHODS]] = Field(  # type: ignore[valid-type]
        description=f"Pre-training methods, each run on every source ({', '.join(METHODS)}).")
    towers: list[str] = Field(
        default_factory=lambda: [PretrainConfig.model_fields["model"].default],
        description=PretrainConfig.model_fields["model"].description)
    budgets: dict[str, BudgetSpec] = Field(  # type: ignore[valid-type]
        default_factory=lambda: {"default": BudgetSpec()},
        description="Pre-training budgets by name (epochs or train_samples).")
    pretrain: PretrainSettings = Field(default_factory=PretrainSettings,  # type: ignore[valid-type]
                                       description=PretrainSettings.__doc__)
    downstream: dict[str, DownstreamSpec] = Field(
        description="Downstream sets by name, each fine-tuned on and evaluated.")
    finetune: FinetuneSettings = Field(default_factory=FinetuneSettings,  # type: ignore[valid-type]
                                       description=FinetuneSettings.__doc__)
    scratch: ScratchSpec | None = Field(default_factory=ScratchSpec,
                                        description=ScratchSpec.__doc__ + " null: none.")
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings,  # type: ignore[valid-type]
                                       description=EvaluateSettings.__doc__)
    report: ReportSettings = Field(default_factory=ReportSettings,  # type: ignore[valid-type]
                                   description=ReportSettings.__doc__)

    @model_validator(mode="after")
    def _grid(self) -> StudySpec:
        for what, names in (("sources", self.sources), ("downstream", self.downstream),
                            ("budgets", self.budgets)):
            if not names:
                raise ValueError(f"{what}: name at least one (the grid is empty)")
            for n in names:
                if not re.fullmatch(_NAME, n):
                    raise ValueError(f"{what}: {n!r} is not a name (letters, digits, ._- only)")
        for what, items in (("methods", self.methods), ("towers", self.towers)):
            if not items:
                raise ValueError(f"{what}: name at least one (the grid is empty)")
            if len(set(items)) != len(items):
                dup = next(i for i in items if items.count(i) > 1)
                raise ValueError(f"{what}: {dup!r} is listed twice")
        for n, d in self.downstream.items():
            for o in d.ood:
                if not re.fullmatch(r"[A-Za-z0-9_+-]+", o):
                    raise ValueError(f"downstream.{n}.ood: {o!r} is not a set name "
                                     "(letters, digits, _+- only)")
            suites = [o for o, s in d.ood.items() if s.suite is not None]
            if len(suites) > 1:
                raise ValueError(f"downstream.{n}.ood: one suite per downstream set (got "
                                 f"{', '.join(suites)})")
        if "scratch" in split_list(self.finetune.modes):
            raise ValueError("finetune.modes: scratch is the baseline, set by the scratch "
                             "section, not a fine-tuning mode")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


# -- loading ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (it keeps the last
    silently, which would drop a source or downstream set named twice)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate name {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _line_of(node: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at ``path`` (the deepest one that exists)."""
    line = None
    for part in path:
        if node is None:
            break
        line = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if str(k.value) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
        else:
            node = None
    if node is not None:
        line = node.start_mark.line + 1
    return line


def _describe(e: ValidationError, root: yaml.Node | None, where: str) -> str:
    err = e.errors()[0]
    # Pydantic puts the union member or validator name in the path; keep the spec's keys.
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (
        p.startswith(("function-", "literal[")) or p in ("SuiteSpec", "TestSpec"))))
    path = ".".join(str(p) for p in loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(
        value, dict | list) else f" (got {value!r})"
    if not loc:  # a check across fields: its message starts with the path it is about
        m = re.match(r"([A-Za-z0-9_.+-]+): ", msg)
        loc = tuple(m.group(1).split(".")) if m else ()
    line = _line_of(root, loc)
    at = f" (line {line})" if line else ""
    return f"study spec {where}: {path + ': ' if path else ''}{msg}{shown}{at}"


def parse(text: str, where: str = "<text>") -> StudySpec:
    """Parse and validate a spec's YAML text; :class:`UpstreamError` names the field and line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UpstreamError(f"study spec {where}: not valid YAML: {problem}{at}") from None
    if not isinstance(data, dict):
        raise UpstreamError(f"study spec {where}: expected a mapping of fields (name, sources, "
                            "methods, downstream, ...)")
    try:
        return StudySpec(**data)
    except ValidationError as e:
        raise UpstreamError(_describe(e, root, where)) from None


def shipped() -> list[str]:
    """Names of the studies shipped with upstream (``studies/*.yaml``)."""
    from importlib import resources

    folder = resources.files("upstream.studies")
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load(path_or_text: str) -> tuple[StudySpec, str]:
    """The spec in a file (local path or ``s3://`` URI), a shipped study by name
    (``entezari-mini``), or YAML text; returns (spec, its text).

    A value with a line break, or one that does not end in ``.yaml``/``.yml``, is YAML text:
    that is how a spec arrives as a pipeline parameter from the Kubeflow UI's run form.
    """
    from upstream import storage

    s = path_or_text.strip()
    if s in shipped():
        from importlib import resources

        text = resources.files("upstream.studies").joinpath(f"{s}.yaml").read_text()
        return parse(text, f"{s} (shipped)"), text
    if "\n" not in s and s.endswith((".yaml", ".yml")):
        if not storage.exists(s):
            raise UpstreamError(f"study spec {s}: no such file")
        text = storage.read_bytes(s).decode()
        return parse(text, s), text
    return parse(path_or_text), path_or_text


def line_of(text: str, path: tuple[Any, ...]) -> int | None:
    """The line of ``path`` in a spec's text (for errors found after parsing)."""
    try:
        return _line_of(yaml.compose(text, Loader=yaml.SafeLoader), path)
    except yaml.YAMLError:
        return None
