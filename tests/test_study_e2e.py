"""End to end: `upstream run study --local SPEC` on the real local S3 server and MLflow server.

A tiny study runs through kfp.local exactly as `make demo` runs the miniature one; the
assertions read what the step lines, MLflow and S3 hold afterwards. Then the reliability
drills: the same study in fresh locations killed with SIGKILL part-way and run again finishes
without redoing finished units and gives the same report numbers, and a second study that
shares units with the first reuses them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from upstream import storage

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

SPEC = """\
name: study-e2e
experiment: study-e2e
sources:
  fractals: {source: fractals, num_classes: 4, samples_per_class: 16}
methods: [supervised]
budgets:
  tiny: {train_samples: 128}
pretrain: {batch_size: 16}
downstream:
  digits:
    source: digits
    samples_per_class: 30
    ood:
      mixed: {corruption: mixed, severity: 3}
finetune: {modes: lp, shots: "1,5,0", seeds: "0,1", min_steps: 40}
scratch: {lrs: "1e-3"}
report: {compare: scratch, bootstrap: 200}
"""
#: The same study with a second source: every unit of the first is shared.
SPEC_MORE = SPEC.replace(
    "  fractals: {source: fractals, num_classes: 4, samples_per_class: 16}\n",
    "  fractals: {source: fractals, num_classes: 4, samples_per_class: 16}\n"
    "  shapes: {source: shapes, num_classes: 4, samples_per_class: 16}\n",
).replace("report: {compare: scratch,", "report: {compare: \"scratch,source\",")

STEP = re.compile(r"^step (\S+) (succeeded|cached|failed) in")


def _run(spec: Path, home: Path, root: str, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "upstream", "run", "study", "--local", str(spec),
         "--data-root", f"{root}/data", "--work-root", f"{root}/runs"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "UPSTREAM_HOME": str(home)}, **popen)


def _finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    return out, err


def _steps(stderr: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(STEP.match, stderr.splitlines()) if m}


def _report_numbers(stdout: str) -> pd.DataFrame:
    """Every model's numbers in the report (experiments.csv), in a fixed order."""
    import io

    page = re.search(r"^report: (\S+)", stdout, re.M).group(1)
    csv = storage.read_bytes(storage.join(page.rsplit("/", 1)[0], "experiments.csv"))
    table = pd.read_csv(io.BytesIO(csv))
    keys = ["source", "method", "mode", "k", "seed"]
    return table[[*keys, "id", "ood", "er"]].sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def spec_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("specs")
    (folder / "study.yaml").write_text(SPEC)
    (folder / "more.yaml").write_text(SPEC_MORE)
    return folder / "study.yaml", folder / "more.yaml"


@pytest.fixture(scope="module")
def first_run(local_services, spec_files):
    root = f"s3://upstream/test-study-{uuid.uuid4().hex[:8]}"
    out, err = _finish(_run(spec_files[0], local_services.home, root))
    return root, out, err


def test_one_line_per_step_and_where_the_report_is(first_run) -> None:
    _, out, err = first_run
    steps = _steps(err)
    # 4 plan steps, 4 shard sets (source, train, test, mixed), 1 empty corruption level, 1
    # pretrain, 2 grids and their
    # 2 evaluations (pre-trained and scratch), the report.
    assert len(steps) == 4 + 4 + 1 + 1 + 2 + 2 + 1, steps
    assert set(steps.values()) == {"succeeded"}
    for line in err.splitlines():  # no executor input, no MLflow "View run" lines
        assert "executorInput" not in line and "View run" not in line
    assert re.search(r"^report: s3://\S+/report\.html \(a copy: \S+report\.html\)$", out, re.M)
    assert "MLflow UI: http://127.0.0.1:" in out
    copy = re.search(r"\(a copy: (\S+)\)", out).group(1)
    assert "<html" in Path(copy).read_text()[:2000].lower()


def test_units_in_mlflow_equal_the_plan(first_run, local_services, spec_files) -> None:
    import mlflow

    from upstream.study import plan as study_plan
    from upstream.study import spec as study_spec

    # The services the study ran against: an earlier test in this worker may have pointed
    # mlflow, or the environment, elsewhere (set_tracking_uri outlives it).
    mlflow.set_tracking_uri(local_services.mlflow_uri)

    root, _, _ = first_run
    spec, text = study_spec.load(str(spec_files[0]))
    plan = study_plan.build(spec, f"{root}/data", f"{root}/runs", text)
    exp = mlflow.get_experiment_by_name("study-e2e")
    runs = mlflow.search_runs([exp.experiment_id], output_format="list",
                              filter_string="tags.`upstream.group` = 'study-e2e'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    by_stage: dict[str, int] = {}
    for r in parents:
        by_stage[r.data.tags["upstream.stage"]] = by_stage.get(r.data.tags["upstream.stage"],
                                                               0) + 1
    assert by_stage == {k: plan.count(k) for k in study_plan.KINDS if plan.count(k)}
    for u in plan.units["evaluate"]:
        assert storage.exists(storage.join(u.output, "evaluation.json"))


def test_killed_and_rerun_redoes_nothing_and_reports_the_same(first_run, local_services,
                                                              spec_files) -> None:
    root = f"s3://upstream/test-study-{uuid.uuid4().hex[:8]}"
    proc = _run(spec_files[0], local_services.home, root, start_new_session=True)
    # Kill the whole run (the CLI and its step processes) once the pre-training has finished.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if any(u.endswith("checkpoint.pt") for u in storage.list_files(f"{root}/runs/pretrain")):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "the study ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    _, killed_err = proc.communicate(timeout=60)
    finished = {s for s, status in _steps(killed_err).items() if status == "succeeded"}
    assert finished and "study-report" not in finished

    out, err = _finish(_run(spec_files[0], local_services.home, root))
    steps = _steps(err)
    assert {s for s in finished if steps.get(s) == "cached"} == finished, steps
    pd.testing.assert_frame_equal(_report_numbers(out), _report_numbers(first_run[1]))


def test_a_second_study_reuses_the_shared_units(first_run, local_services, spec_files) -> None:
    root, _, first_err = first_run
    out, err = _finish(_run(spec_files[1], local_services.home, root))
    steps = _steps(err)
    cached = [s for s, status in steps.items() if status == "cached"]
    # Every shard, pre-training, fine-tuning and evaluation unit of the first study, and the
    # plan of the empty corruption level, is a cache hit; the second source's are new.
    first_units = [s for s, status in _steps(first_err).items()
                   if status == "succeeded" and "plan" not in s and "report" not in s]
    assert len(cached) >= len(first_units), steps
    numbers = _report_numbers(out)
    assert set(numbers["source"]) >= {"fractals", "shapes"}
