"""The report stage's config: which MLflow runs to read, what to compute from them, where the
report goes. The CLI options and the Kubeflow component parameters are derived from it."""

from __future__ import annotations

import re
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from upstream.config import StageConfig, split_list, wiring

#: Tags a baseline filter may name (``upstream.<name>`` on every model run).
BASELINE_KEYS = ("mode", "method", "source", "model", "shots")
#: Comparison families, in the order the significance table lists them.
FAMILIES = ("scratch", "source", "method", "mode")


def _path_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "_"


class ReportConfig(StageConfig):
    stage: ClassVar[str] = "report"
    not_decisive: ClassVar[frozenset[str]] = frozenset({"output"})

    experiment: str = Field(
        "upstream", description="MLflow experiment whose model runs are read (the report's own "
        "run is logged there too)."
    )
    group: str = Field(
        "", description="Only model runs with this upstream.group tag (the pipeline run that "
        "made them); empty: every model run of the experiment."
    )
    evaluations: str = wiring(
        "", description="Comma list of evaluation outputs (folders holding evaluation.json, "
        "as a study writes them): exactly their model runs are read, in whichever experiment "
        "they are, and group is ignored. Empty: the runs of experiment and group."
    )
    output: str = wiring(
        "", description="Folder or s3:// prefix for the report files (default: "
        "$UPSTREAM_HOME/reports/<experiment>[-<group>]); report.html is written last."
    )
    metric: Literal["top1", "macro_f1"] = Field(
        "top1", description="The metric every figure and table uses, ID and OOD."
    )
    ood: str = Field(
        "", description="OOD entry to use: empty for the runs' ood_<metric> (the mean over "
        "their OOD entries), else an entry's name, e.g. corruptions (ood.corruptions.<metric>), "
        "rotated (ood.rotated.<metric>) or one corruption of a suite, corruptions.fog."
    )
    baseline: str = Field(
        "mode=scratch", description="The models the effective-robustness line is fitted on: a "
        "comma list of tag=value filters over mode, method, source, model, shots (a tag named "
        "twice matches either value; shots=all is k=0); none leaves ER out."
    )
    transform: Literal["logit", "probit"] = Field(
        "logit", description="Axis scale of the OOD-against-ID plot and of the ER line."
    )
    bootstrap: int = Field(
        1000, ge=100, description="Bootstrap resamples for every CI (baseline lines, "
        "differences of means, test examples) and the permutation tests."
    )
    example_bootstrap: bool = Field(
        False, description="Also a CI of each model's ER from resampling its own test examples "
        "(reads every run's predictions.npz), and Clopper–Pearson error bars in the scatter."
    )
    compare: str = Field(
        "scratch,source,method", description="Comma list of comparison families: scratch "
        "(each pre-trained group against scratch at the same k), source, method, mode (pairs "
        "that differ only in that, at the same k); none for no significance table."
    )
    seed: int = Field(0, description="Seed of every bootstrap and permutation resample.")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name the MLflow experiment")
        return v

    @field_validator("group")
    @classmethod
    def _group(cls, v: str) -> str:
        # MLflow's filter grammar has no escape for quotes inside a string literal.
        if "'" in v or '"' in v or "\\" in v:
            raise ValueError("a group name has no quotes or backslashes")
        return v

    @field_validator("ood")
    @classmethod
    def _ood(cls, v: str) -> str:
        if v and not re.fullmatch(r"[A-Za-z0-9_.+-]+", v):
            raise ValueError("an OOD entry name has no spaces or punctuation other than _.+-")
        return v

    @field_validator("baseline")
    @classmethod
    def _baseline(cls, v: str) -> str:
        if v.strip() == "none":
            return v
        parts = split_list(v)
        if not parts:
            raise ValueError("give tag=value filters (e.g. mode=scratch) or none")
        for part in parts:
            key, eq, value = part.partition("=")
            if not eq or not value.strip():
                raise ValueError(f"a filter is tag=value (got {part!r})")
            if key.strip() not in BASELINE_KEYS:
                raise ValueError(f"unknown tag {key.strip()!r} (one of "
                                 f"{', '.join(BASELINE_KEYS)})")
        return v

    @field_validator("compare")
    @classmethod
    def _compare(cls, v: str) -> str:
        if v.strip() == "none":
            return v
        parts = split_list(v)
        if not parts:
            raise ValueError("name at least one family, or none")
        for p in parts:
            if p not in FAMILIES:
                raise ValueError(f"unknown family {p!r} (one of {', '.join(FAMILIES)}, or none)")
        if len(set(parts)) != len(parts):
            raise ValueError("a family is listed twice")
        return v

    # -- parsed ------------------------------------------------------------------------------

    @property
    def baseline_filters(self) -> dict[str, set[str]] | None:
        """``{tag: allowed values}`` (AND across tags, OR within one); None for ``none``."""
        if self.baseline.strip() == "none":
            return None
        out: dict[str, set[str]] = {}
        for part in split_list(self.baseline):
            key, _, value = part.partition("=")
            value = value.strip()
            if key.strip() == "shots" and value == "all":
                value = "0"
            out.setdefault(key.strip(), set()).add(value)
        return out

    @property
    def families(self) -> list[str]:
        if self.compare.strip() == "none":
            return []
        chosen = set(split_list(self.compare))
        return [f for f in FAMILIES if f in chosen]

    @property
    def ood_key(self) -> str:
        """The MLflow metric read as the OOD value."""
        return f"ood_{self.metric}" if not self.ood else f"ood.{self.ood}.{self.metric}"

    def output_location(self) -> str:
        if self.output:
            return self.output
        from upstream import tracking

        name = _path_safe(self.experiment) + (f"-{_path_safe(self.group)}" if self.group else "")
        return str(tracking.home() / "reports" / name)
