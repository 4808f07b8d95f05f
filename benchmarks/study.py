"""What running a study as a local pipeline costs beyond its units' own compute.

    .venv/bin/python benchmarks/study.py [--spec FILE] [--keep]

Against the real local services (SeaweedFS + MLflow, in a temporary ``UPSTREAM_HOME``), in
one run:

- the **baseline**: every unit of the spec's plan run in this one process, one after another,
  by the same code a pipeline step calls (``run_study_unit``): each unit's own compute
  (training, feature extraction, evaluation, its MLflow logging) with no process start,
  imports or pipeline around it;
- the **study**: ``upstream run study --local`` on the same spec, in other locations, so that
  nothing is shared with the baseline.

It prints ``ratio study_wall_vs_unit_compute`` (the study's wall time over the baseline's; goal
≤ 1.3), ``ratio units_run_vs_planned`` (the stage runs the study logged to MLflow, counted by
kind, over the units ``upstream study plan`` lists; goal 1.0), and where the rest went: per
step, the time around the stage call (process start, imports, MLflow set-up, writing the
step's outputs, interpreter exit), from the step lines and the ``study unit ... s in the
stage`` line each step logs. The local runner runs 2 loop iterations at once, so the study can
take less wall time than the baseline's sum.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
name: bench-study
sources:
  fractals: {source: fractals, num_classes: 10, samples_per_class: 50}
  shapes: {source: shapes, samples_per_class: 60}
methods: [supervised]
budgets:
  short: {train_samples: 3000}
pretrain: {batch_size: 64}
downstream:
  clutter:
    source: clutter
    samples_per_class: 40
    ood:
      mixed: {corruption: mixed, severity: 3}
finetune: {modes: "lp,ft", shots: "1,5,0", seeds: "0,1", lrs: "1e-3", min_steps: 60}
scratch: {lrs: "1e-3"}
report: {compare: "scratch,source", bootstrap: 200}
"""

STEP = re.compile(r"^step (\S+) (succeeded|cached|failed) in ([0-9.]+) s")
IN_STAGE = re.compile(r"study unit (\w+): ([0-9.]+) s in the stage")


def baseline(text: str, root: str, experiment: str) -> float:
    """Seconds to run every unit of the plan in this process, in the pipeline's order."""
    from upstream.components.glue import run_study_unit
    from upstream.report import report
    from upstream.study import plan as study_plan
    from upstream.study import spec as study_spec

    spec = study_spec.parse(text.replace("name: bench-study", f"name: {experiment}"))
    plan = study_plan.build(spec, f"{root}/data", f"{root}/runs", text)
    t0 = time.perf_counter()
    for kind in ("shard", "corrupt", "pretrain"):
        for u in plan.units[kind]:
            run_study_unit(kind, u.config_json(), spec.name)
    for f, e in zip(plan.units["finetune"], plan.evaluations, strict=True):
        run_study_unit("finetune", f.config_json(), spec.name)
        run_study_unit("evaluate", e.config_json(), spec.name)
    report(plan.report_config())
    return time.perf_counter() - t0


def study(spec_file: Path, root: str, home: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "upstream", "run", "study", "--local", str(spec_file),
         "--data-root", f"{root}/data", "--work-root", f"{root}/runs"],
        capture_output=True, text=True, env={**os.environ, "UPSTREAM_HOME": str(home)})
    wall = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(f"the study failed:\n{proc.stderr[-4000:]}")
    return wall, proc.stderr


def units_in_mlflow(experiment: str, group: str) -> dict[str, int]:
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs([exp.experiment_id], output_format="list",
                              filter_string=f"tags.`upstream.group` = '{group}'")
    counts: dict[str, int] = {}
    for r in runs:
        if "mlflow.parentRunId" not in r.data.tags:
            stage = r.data.tags.get("upstream.stage", "?")
            counts[stage] = counts.get(stage, 0) + 1
    return counts


def overheads(run_dir: Path, stderr: str) -> dict[str, list[float]]:
    """Per kind of step: its duration minus the time in the stage call."""
    durations = {m.group(1): float(m.group(3)) for m in map(STEP.match, stderr.splitlines())
                 if m}
    out: dict[str, list[float]] = {}
    for step, seconds in durations.items():
        log = run_dir / "logs" / f"{step}.log"
        found = IN_STAGE.findall(log.read_text()) if log.is_file() else []
        kind = found[-1][0] if found else step.rsplit("/", 1)[-1].removeprefix("study-")
        inside = float(found[-1][1]) if found else 0.0
        out.setdefault(kind, []).append(seconds - inside)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", type=Path, help="A study spec (default: a small one, above).")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary home.")
    args = ap.parse_args()
    text = args.spec.read_text() if args.spec else SPEC

    from upstream import services, storage
    from upstream.study import plan as study_plan
    from upstream.study import spec as study_spec

    home = Path(tempfile.mkdtemp(prefix="upstream-bench-study-"))
    info = services.up(home)
    services.apply_env(info, override=True)
    storage._client.cache_clear()
    os.environ["UPSTREAM_HOME"] = str(home)
    try:
        spec_file = home / "spec.yaml"
        spec_file.write_text(text)
        spec = study_spec.parse(text)
        plan = study_plan.build(spec, "s3://upstream/bench-study/data",
                                "s3://upstream/bench-study/runs", text)
        planned = {k: plan.count(k) for k in study_plan.KINDS if plan.count(k)}

        base = baseline(text, "s3://upstream/bench-baseline", spec.name + "-baseline")
        wall, stderr = study(spec_file, "s3://upstream/bench-study", home)
        run_dir = Path(re.findall(r"step logs in (\S+)/logs", stderr)[-1])
        ran = units_in_mlflow(spec.experiment_name, spec.name)

        print(f"plan: {planned}")
        print(f"units in MLflow: {ran}")
        print(f"baseline (every unit in one process, in order): {base:.1f} s")
        print(f"study (upstream run study --local): {wall:.1f} s")
        for kind, values in sorted(overheads(run_dir, stderr).items()):
            print(f"  around the stage, {kind}: median {statistics.median(values):.1f} s × "
                  f"{len(values)} step(s) = {sum(values):.1f} s")
        print(f"ratio study_wall_vs_unit_compute {wall / base:.3f}")
        if ran != planned:
            print("units run differ from the plan by kind (see above)")
        print(f"ratio units_run_vs_planned {sum(ran.values()) / sum(planned.values()):.3f}")
    finally:
        services.down(home)
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
