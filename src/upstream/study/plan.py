"""A study spec expanded into its units of work, each once.

A *unit* is one stage call with a complete config (its input and output locations filled in):
a shard set, a corruption suite, a pre-trained model, a fine-tuning grid, an evaluation, the
report. Every output location is derived from the unit's config (:mod:`upstream.locations`),
so units are shared by construction: each pre-training source and each downstream split is
sharded once however many units read it, each (source, method, tower, budget) is pre-trained
once, and a unit another study already finished is found complete and does nothing.

The plan is what ``upstream study plan`` prints, what ``upstream study validate`` checks, and
what the ``study`` pipeline's plan steps hand to its loops, level by level.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from typing import Any

from pydantic import BaseModel, ValidationError

from upstream import locations
from upstream.config import StageConfig, split_list
from upstream.errors import UpstreamError
from upstream.evaluate import CorruptConfig, EvaluateConfig
from upstream.finetune import FinetuneConfig
from upstream.pretrain import PretrainConfig
from upstream.report import ReportConfig
from upstream.shards.stage import ShardConfig
from upstream.study.spec import StudySpec, line_of

#: The kinds of unit, in the order the pipeline runs them.
KINDS = ("shard", "corrupt", "pretrain", "finetune", "evaluate", "report")
#: The pipeline's levels: each runs after the one before; finetune and evaluate share a loop.
LEVELS = ("shard", "corrupt", "pretrain", "transfer")


@dataclasses.dataclass
class Unit:
    """One stage call of the study."""

    kind: str
    key: str  # readable and unique within the plan: "pretrain fractals/clip/tiny-rn/default"
    config: StageConfig
    names: list[str] = dataclasses.field(default_factory=list)  # spec entries that use it

    @property
    def output(self) -> str:
        return str(getattr(self.config, "output", ""))

    def config_json(self) -> str:
        return json.dumps(self.config.model_dump(mode="json"), sort_keys=True)


@dataclasses.dataclass
class Plan:
    spec: StudySpec
    data_root: str
    work_root: str
    units: dict[str, list[Unit]]  # kind → units
    #: The evaluation unit of each fine-tuning unit (same order as units["finetune"]).
    evaluations: list[Unit]

    def count(self, kind: str) -> int:
        return len(self.units[kind])

    def items(self, level: str) -> list[dict[str, str]]:
        """The loop items of a pipeline level: ``{"id", "config"}`` (transfer: ``finetune`` and
        ``evaluate``), configs as JSON strings so that no value changes type on the way (the
        local runner turns ints inside lists into floats)."""
        if level == "transfer":
            return [{"id": f.key, "finetune": f.config_json(), "evaluate": e.config_json()}
                    for f, e in zip(self.units["finetune"], self.evaluations, strict=True)]
        if level not in LEVELS:
            raise UpstreamError(f"study: no level {level!r} (one of {', '.join(LEVELS)})")
        return [{"id": u.key, "config": u.config_json()} for u in self.units[level]]

    def report_config(self, evaluations: list[str] | None = None) -> ReportConfig:
        [report] = self.units["report"]
        config = report.config
        if evaluations is not None:
            config = ReportConfig.parse(**config.model_dump() | {
                "evaluations": ",".join(evaluations)})
        return config  # type: ignore[return-value]


class _Where:
    """Turns a stage config's validation error into one naming the spec's path and line."""

    def __init__(self, text: str, where: str) -> None:
        self.text = text
        self.where = where

    def fail(self, path: tuple[Any, ...], message: str) -> UpstreamError:
        line = line_of(self.text, path) if self.text else None
        at = f" (line {line})" if line else ""
        return UpstreamError(f"study spec {self.where}: {'.'.join(map(str, path))}: "
                             f"{message}{at}")

    def stage(self, cls: type[StageConfig], paths: dict[str, tuple[Any, ...]],
              default: tuple[Any, ...], **values: Any) -> Any:
        """``cls(**values)``; an error names the spec path that set the failing field."""
        try:
            return cls(**values)
        except ValidationError as e:
            err = e.errors()[0]
            field = str(err["loc"][0]) if err["loc"] else ""
            msg = err["msg"].removeprefix("Value error, ")
            value = err.get("input")
            shown = "" if isinstance(value, dict) or not field else f" (got {value!r})"
            path = paths.get(field, (*default, field) if field else default)
            raise self.fail(path, msg + shown) from None


def _dump(model: BaseModel | None) -> dict[str, Any]:
    return {} if model is None else {k: v for k, v in model.model_dump().items()
                                     if v is not None}


def _nonneg_ints(text: str) -> list[int]:
    return [int(x) for x in split_list(text)]


def build(spec: StudySpec, data_root: str, work_root: str, text: str = "",
          where: str = "<text>") -> Plan:
    """Every unit of ``spec`` once, with its config complete; errors name the spec's path."""
    w = _Where(text, where)
    exp = spec.experiment_name
    units: dict[str, dict[str, Unit]] = {k: {} for k in KINDS}

    def add(kind: str, key: str, config: StageConfig, name: str) -> Unit:
        out = str(getattr(config, "output", "")) or key
        unit = units[kind].get(out)
        if unit is None:
            unit = units[kind][out] = Unit(kind, key, config)
        unit.names.append(name)
        return unit

    data = spec.data.model_dump()

    def shard(key: str, path: tuple[Any, ...], values: dict[str, Any], name: str) -> Unit:
        paths = {f: ("data", f) for f in data}
        unplaced = w.stage(ShardConfig, paths, path, **data, **values, experiment=exp)
        placed = unplaced.model_copy(update={"output": locations.shard_output(data_root,
                                                                             unplaced)})
        return add("shard", key, placed, name)

    # Pre-training data.
    sources = {n: shard(f"shard {n}/train", ("sources", n), {**_dump(s), "split": "train"},
                        f"sources.{n}") for n, s in spec.sources.items()}

    # Downstream sets: train (with its k-shot lists), ID test, corrupted copies, the suite.
    shots = _nonneg_ints(spec.finetune.shots)
    seeds = _nonneg_ints(spec.finetune.seeds)
    kshot = ",".join(str(k) for k in sorted(set(shots)) if k)
    trials = max(seeds) + 1 if seeds and min(seeds) >= 0 else 3
    train: dict[str, Unit] = {}
    test: dict[str, Unit] = {}
    ood: dict[str, list[tuple[str, Unit]]] = {}
    for n, d in spec.downstream.items():
        base = d.model_dump(exclude={"test", "ood"})
        train[n] = shard(f"shard {n}/train", ("downstream", n),
                         {**base, "split": "train", "kshot": kshot, "kshot_trials": trials},
                         f"downstream.{n}.train")
        test_values = {**base, **_dump(d.test), "split": "test"}
        test[n] = shard(f"shard {n}/test", ("downstream", n, "test"), test_values,
                        f"downstream.{n}.test")
        ood[n] = []
        for o, spec_o in d.ood.items():
            if spec_o.suite is None:
                u = shard(f"shard {n}/test/{o}", ("downstream", n, "ood", o),
                          {**test_values, "corruption": spec_o.corruption,
                           "severity": spec_o.severity}, f"downstream.{n}.ood.{o}")
            else:
                unplaced = w.stage(
                    CorruptConfig, {}, ("downstream", n, "ood", o, "suite"),
                    data=test[n].output, **spec_o.suite.model_dump(), seed=spec.data.seed,
                    workers=spec.data.workers, experiment=exp)
                placed = unplaced.model_copy(
                    update={"output": locations.suite_output(data_root, unplaced)})
                u = add("corrupt", f"corrupt {n}/test/{o}", placed, f"downstream.{n}.ood.{o}")
            ood[n].append((o, u))

    # Pre-training: sources × methods × towers × budgets.
    pretrained: list[Unit] = []
    pre_values = spec.pretrain.model_dump()
    pre_paths = {f: ("pretrain", f) for f in pre_values}
    for sname, src in sources.items():
        for mi, method in enumerate(spec.methods):
            for ti, tower in enumerate(spec.towers):
                for bname, budget in spec.budgets.items():
                    paths = {**pre_paths, "method": ("methods", mi), "model": ("towers", ti),
                             **{f: ("budgets", bname, f) for f in budget.model_dump()}}
                    unplaced = w.stage(
                        PretrainConfig, paths, ("pretrain",), data=src.output, method=method,
                        model=tower, source_name=sname, **budget.model_dump(), **pre_values,
                        experiment=exp)
                    placed = unplaced.model_copy(
                        update={"output": locations.pretrain_output(work_root, unplaced)})
                    pretrained.append(add(
                        "pretrain", f"pretrain {sname}/{method}/{tower}/{bname}", placed,
                        f"{sname}/{method}/{tower}/{bname}"))

    # Transfer: every pre-trained model and the scratch baseline of every tower, on every
    # downstream set; each fine-tuning grid evaluated on its set's ID and OOD sets.
    ft_values = spec.finetune.model_dump()
    ft_paths = {f: ("finetune", f) for f in ft_values}
    cache = locations.feature_cache(work_root)
    evaluations: dict[str, Unit] = {}
    for n in spec.downstream:
        grids: list[tuple[str, FinetuneConfig]] = []
        for p in pretrained:
            grids.append((p.key.removeprefix("pretrain "), w.stage(
                FinetuneConfig, ft_paths, ("finetune",), pretrained=p.output,
                data=train[n].output, feature_cache=cache, **ft_values, experiment=exp)))
        if spec.scratch is not None:
            for ti, tower in enumerate(spec.towers):
                values = ft_values | {"modes": "scratch", "lrs": spec.scratch.lrs,
                                      "batchnorm": "preset"}
                grids.append((f"scratch/{tower}", w.stage(
                    FinetuneConfig, {**ft_paths, "lrs": ("scratch", "lrs"),
                                     "model": ("towers", ti)}, ("scratch",),
                    data=train[n].output, model=tower, feature_cache=cache, **values,
                    experiment=exp)))
        ood_data = ",".join(f"{o}={u.output}" for o, u in ood[n])
        for label, unplaced in grids:
            placed = unplaced.model_copy(
                update={"output": locations.finetune_output(work_root, unplaced)})
            ft = add("finetune", f"finetune {label} → {n}", placed, f"{label}→{n}")
            ev_unplaced = w.stage(
                EvaluateConfig, {f: ("evaluate", f) for f in spec.evaluate.model_dump()},
                ("evaluate",), model=ft.output, id_data=test[n].output, ood_data=ood_data,
                feature_cache=cache, **spec.evaluate.model_dump(), experiment=exp)
            ev_placed = ev_unplaced.model_copy(
                update={"output": locations.evaluate_output(work_root, ev_unplaced)})
            evaluations[ft.output] = add("evaluate", f"evaluate {label} → {n}", ev_placed,
                                         f"{label}→{n}")

    # The report over every evaluation.
    ev_outputs = [u.output for u in units["evaluate"].values()]
    report_values = spec.report.model_dump()
    report = w.stage(ReportConfig, {f: ("report", f) for f in report_values}, ("report",),
                     experiment=exp, group=spec.name, evaluations=",".join(ev_outputs),
                     **report_values)
    import hashlib

    digest = hashlib.sha256(report.model_dump_json().encode()).hexdigest()[:12]
    report = report.model_copy(update={"output": _join(work_root, "reports",
                                                       f"{spec.name}-{digest}")})
    add("report", f"report {spec.name}", report, "report")

    finetunes = list(units["finetune"].values())
    plan = Plan(spec, data_root, work_root, {k: list(v.values()) for k, v in units.items()},
                [evaluations[f.output] for f in finetunes])
    _check_grid(plan, w)
    return plan


def _join(root: str, *parts: str) -> str:
    from upstream import storage

    return storage.join(root, *parts)


def _check_grid(plan: Plan, w: _Where) -> None:
    """The checks across the grid: comparisons and the baseline name what the grid holds."""
    spec = plan.spec
    families = split_list(spec.report.compare) if spec.report.compare.strip() != "none" else []
    modes = split_list(spec.finetune.modes)
    sizes = {"source": len(spec.sources), "method": len(spec.methods), "mode": len(modes)}
    for fam in families:
        if fam == "scratch" and spec.scratch is None:
            raise w.fail(("report", "compare"), "compares against scratch, but the study has "
                         "no scratch baseline (scratch: null)")
        if fam in sizes and sizes[fam] < 2:
            raise w.fail(("report", "compare"), f"compares {fam}s, but the grid has one "
                         f"{fam} ({sizes[fam]}); list ≥ 2 or drop {fam!r}")
    if spec.report.baseline.strip() == "none":
        return
    present = {
        "mode": set(modes) | ({"scratch"} if spec.scratch is not None else set()),
        "method": set(spec.methods) | ({"none"} if spec.scratch is not None else set()),
        "source": set(spec.sources) | ({"none"} if spec.scratch is not None else set()),
        "model": set(spec.towers),
        "shots": {str(k) for k in _nonneg_ints(spec.finetune.shots)} | {"all"},
    }
    for part in split_list(spec.report.baseline):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if value not in present[key]:
            raise w.fail(("report", "baseline"), f"{key}={value} names no group of the grid "
                         f"({key} is one of {', '.join(sorted(present[key]))})")


# -- checks that read the sources (no image made) ---------------------------------------------


def cheap_sources() -> set[str]:
    """Source kinds whose class counts are known without downloading or copying anything."""
    from upstream.data.sources import SYNTHETIC

    return {*SYNTHETIC, "imagefolder", "captions"}


def check_sizes(plan: Plan, text: str = "", where: str = "<text>") -> dict[str, dict[str, int]]:
    """Each downstream set's k (plus the validation examples) against its smallest class;
    every cheap source opened and its interventions planned. Returns class counts by unit."""
    from upstream.data.sources import parse_sources
    from upstream.finetune.splits import check_sizes as check_k
    from upstream.shards.stage import planned_class_counts

    w = _Where(text, where)
    counts: dict[str, dict[str, int]] = {}
    cheap = cheap_sources()
    for u in plan.units["shard"]:
        if not all(s.kind in cheap for s in parse_sources(u.config.source)):
            continue
        try:
            counts[u.key] = planned_class_counts(u.config)  # type: ignore[arg-type]
        except UpstreamError as e:
            path = _spec_path(u.names[0])
            raise w.fail(path, str(e).removeprefix("shard: ")) from None
    shots = _nonneg_ints(plan.spec.finetune.shots)
    for n in plan.spec.downstream:
        key = f"shard {n}/train"
        if key not in counts:
            continue
        try:
            check_k(counts[key], shots, plan.spec.finetune.val_per_class, n)
        except UpstreamError as e:
            raise w.fail(("finetune", "shots"), f"downstream set {n}: "
                         + str(e).removeprefix("finetune: ")) from None
    return counts


def _spec_path(name: str) -> tuple[str, ...]:
    parts = name.split(".")
    return tuple(parts[:-1]) if parts[-1] in ("train",) else tuple(parts)


# -- estimate -------------------------------------------------------------------------------

#: Throughput of one local study step on this project's 2-core CPU machine, measured in the
#: miniature studies' runs (2026-12-01; two steps at a time, one core each) with
#: ``upstream-tiny-rn`` at 32 px: pre-training samples/s per method (SimCLR from
#: ``benchmarks/pretrain.py``'s ratio to CLIP), fine-tuning samples/s (forward and backward),
#: inference images/s. Other towers have no figure here; their units are counted, not timed.
THROUGHPUT = {
    "upstream-tiny-rn": {"clip": 570.0, "supervised": 635.0, "simclr": 410.0,
                         "finetune": 1000.0, "infer": 9000.0},
}
SHARD_IMAGES_PER_S = 500.0
#: An evaluation's cost per model beyond inference (loading it, its MLflow run and figures).
EVALUATE_PER_MODEL_S = 1.2
#: Seconds a local step costs beyond its compute (process start, imports, MLflow set-up).
STEP_OVERHEAD_S = 4.0
#: kfp.local runs two loop iterations at once (``pipelines.launch.LOCAL_PARALLEL_STEPS``).
PARALLEL_STEPS = 2


def estimate(plan: Plan, counts: dict[str, dict[str, int]]) -> dict[str, float | None]:
    """Seconds of compute per kind of unit (None when some unit has no measured figure)."""
    spec = plan.spec
    n_of = {u.output: sum(counts[u.key].values()) for u in plan.units["shard"]
            if u.key in counts}
    out: dict[str, float | None] = dict.fromkeys(KINDS, 0.0)

    def add(kind: str, seconds: float | None) -> None:
        cur = out[kind]
        out[kind] = None if cur is None or seconds is None else cur + seconds

    for u in plan.units["shard"]:
        n = n_of.get(u.output)
        add("shard", None if n is None else n / SHARD_IMAGES_PER_S)
    test_n = {n: n_of.get(locations_of(plan, "test", n)) for n in spec.downstream}
    for u in plan.units["corrupt"]:
        n = n_of.get(u.config.data)  # type: ignore[attr-defined]
        sets = len(split_list(u.config.severities)) * 15  # type: ignore[attr-defined]
        add("corrupt", None if n is None else n * sets / SHARD_IMAGES_PER_S)
    for u in plan.units["pretrain"]:
        c = u.config
        rate = THROUGHPUT.get(c.model, {}).get(c.method)  # type: ignore[attr-defined]
        n = n_of.get(c.data)  # type: ignore[attr-defined]
        samples = c.train_samples or (None if n is None else n * c.epochs)  # type: ignore[attr-defined]
        add("pretrain", None if rate is None or samples is None else samples / rate)
    train_counts = {u.output: counts[u.key] for u in plan.units["shard"] if u.key in counts}
    for u in plan.units["finetune"]:
        add("finetune", _finetune_seconds(u.config, train_counts.get(u.config.data), plan))  # type: ignore[attr-defined, arg-type]
    for f in plan.units["finetune"]:
        rate = THROUGHPUT.get(_tower(f.config, plan), {}).get("infer")
        down = next(n for n in spec.downstream if locations_of(plan, "train", n) == f.config.data)  # type: ignore[attr-defined]
        n_test = test_n.get(down)
        sets = 1 + sum(1 if o.suite is None else 15 * len(split_list(o.suite.severities))
                       for o in spec.downstream[down].ood.values())
        models = len(split_list(f.config.modes)) * len(_nonneg_ints(f.config.shots)) \
            * len(_nonneg_ints(f.config.seeds))  # type: ignore[attr-defined]
        add("evaluate", None if rate is None or n_test is None
            else models * (n_test * sets / rate + EVALUATE_PER_MODEL_S))
    add("report", 10.0 + 0.05 * len(plan.evaluations) * 36)
    return out


def locations_of(plan: Plan, split: str, downstream: str) -> str:
    key = f"shard {downstream}/{split}"
    return next(u.output for u in plan.units["shard"] if u.key == key)


def _tower(config: FinetuneConfig, plan: Plan) -> str:
    if config.model:
        return config.model
    return next(str(u.config.model) for u in plan.units["pretrain"]  # type: ignore[attr-defined]
                if u.output == config.pretrained)


def _finetune_seconds(c: FinetuneConfig, counts: dict[str, int] | None,
                      plan: Plan) -> float | None:
    rates = THROUGHPUT.get(_tower(c, plan))
    if rates is None or counts is None:
        return None
    from upstream.finetune.config import PRESETS

    preset = PRESETS[c.preset]
    batch = c.batch_size or preset.batch_size
    epochs = c.epochs or preset.epochs
    min_steps = c.min_steps if c.min_steps >= 0 else preset.min_steps
    n, classes = sum(counts.values()), max(1, len(counts))
    lrs = len(split_list(c.lrs)) or len(preset.scratch_lrs if c.model else preset.lrs)
    total = 0.0
    for k in _nonneg_ints(c.shots):
        train = n - c.val_per_class * classes if k == 0 else k * classes
        steps = max(min_steps, epochs * math.ceil(max(train, 1) / batch))
        for mode in split_list(c.modes):
            # A probe: the features once, then the C path; a trained mode: every lr's steps.
            per_seed = (n / rates["infer"] + 0.5) if mode in ("lp", "zeroshot") else \
                lrs * steps * min(batch, max(train, 1)) / rates["finetune"]
            total += per_seed * len(_nonneg_ints(c.seeds))
    return total


def summary(plan: Plan, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    """What ``upstream study plan`` prints: units per kind after sharing, and the estimate."""
    seconds = estimate(plan, counts)
    known = [v for v in seconds.values() if v is not None]
    steps = sum(plan.count(k) for k in KINDS) + len(LEVELS)  # + the plan steps
    shared = Counter({k: sum(len(u.names) for u in plan.units[k]) - plan.count(k)
                      for k in KINDS})
    models = 0
    for f in plan.units["finetune"]:
        c = f.config
        models += len(split_list(c.modes)) * len(_nonneg_ints(c.shots)) \
            * len(_nonneg_ints(c.seeds))  # type: ignore[attr-defined]
    return {
        "study": plan.spec.name,
        "experiment": plan.spec.experiment_name,
        "units": {k: plan.count(k) for k in KINDS},
        "shared": {k: v for k, v in shared.items() if v},
        "models": models,
        "steps": steps,
        "compute_s": {k: (None if v is None else round(v, 1)) for k, v in seconds.items()},
        "estimate_s": None if len(known) < len(seconds) else round(
            (sum(known) + STEP_OVERHEAD_S * steps) / PARALLEL_STEPS, 0),
    }


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a (no measured throughput for this tower)"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def render(summary: dict[str, Any]) -> str:
    """``upstream study plan``'s text: a line per kind of unit, then the estimate."""
    lines = [f"study {summary['study']} (MLflow experiment {summary['experiment']}): "
             f"{summary['models']} fine-tuned models, {summary['steps']} pipeline steps"]
    lines.append(f"  {'unit':<10}{'count':>6}  {'shared':>6}  compute")
    for kind in KINDS:
        shared = summary["shared"].get(kind, 0)
        lines.append(f"  {kind:<10}{summary['units'][kind]:>6}  "
                     f"{('−' + str(shared)) if shared else '':>6}  "
                     f"{_duration(summary['compute_s'][kind])}")
    lines.append(f"estimate: {_duration(summary['estimate_s'])} on 2 CPU cores, two steps at "
                 f"a time (throughput measured 2026-12-01, plus {STEP_OVERHEAD_S:.0f} s a "
                 "step)")
    for u in summary.get("unit_list", []):
        lines.append(f"  {u['id']}  →  {u['output']}")
    return "\n".join(lines)
