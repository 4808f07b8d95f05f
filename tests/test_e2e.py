"""End to end: `upstream run transfer --local` on the real local S3 server and MLflow server.

The whole pipeline runs through kfp.local's SubprocessRunner, exactly as `make demo` does,
with tiny settings; the assertions read what MLflow and S3 hold afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from upstream import storage
from upstream.shards import loader

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

TINY = {
    # A mixture with proportions and a class-balanced total: interventions as pipeline params.
    "--pretrain-data-source": "fractals+shapes",
    "--pretrain-data-num-classes": "4",
    "--pretrain-data-samples-per-class": "24",
    "--pretrain-data-proportions": "0.75,0.25",
    "--pretrain-data-num-samples": "96",
    "--pretrain-data-min-shards": "4",
    "--downstream-kshot": "10",
    "--downstream-kshot-trials": "1",
    "--pretrain-epochs": "3",
    "--pretrain-batch-size": "16",
    # Every mode that takes a checkpoint (the demo pre-trains CLIP, so zero-shot works) over
    # 2 k × 2 seeds, beside the scratch baseline, on a two-corruption suite.
    "--finetune-modes": "lp,lp-ft,ft,zeroshot,zeroshot-ft",
    "--finetune-shots": "10,0",
    "--finetune-seeds": "0,1",
    "--finetune-lrs": "1e-3",
    "--finetune-epochs": "2",
    "--finetune-min-steps": "0",
    "--finetune-batch-size": "32",
    "--ood-suite-corruptions": "gaussian_noise,contrast",
    "--ood-suite-severities": "2",
    "--experiment": "e2e",
}
MODES = {"lp", "lp-ft", "ft", "zeroshot", "zeroshot-ft"}


@pytest.fixture(scope="module")
def local_run(local_services):
    args = [a for kv in TINY.items() for a in kv]
    result = subprocess.run(
        [sys.executable, "-m", "upstream", "run", "transfer", "--local", *args],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "UPSTREAM_HOME": str(local_services.home)},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _runs_of(local_run) -> dict[str, list]:
    import mlflow

    # An earlier test may have pointed mlflow elsewhere (set_tracking_uri outlives it); the
    # environment is the services' (tests/integration_fixtures.py).
    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])

    group = re.search(r"upstream\.group=(\S+)", local_run.stdout).group(1)
    exp = mlflow.get_experiment_by_name("e2e")
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`upstream.group` = '{group}'",
        output_format="list",
    )
    by_stage: dict[str, list] = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["upstream.stage"], []).append(run)
    return by_stage


def test_prints_results_and_mlflow_url(local_run, local_services) -> None:
    out = local_run.stdout
    assert f"MLflow UI: {local_services.ui_url}/#/experiments/" in out
    for key in ("id_top1", "id_macro_f1", "ood_top1", "ood_macro_f1"):
        assert re.search(rf"{key}: [01]\.\d{{4}}", out), out


def _role(runs: list, role: str) -> list:
    return [r for r in runs if r.data.tags.get("upstream.role") == role]


def test_mlflow_holds_the_runs_of_every_stage(local_run) -> None:
    runs = _runs_of(local_run)
    counts = {stage: len(r) for stage, r in runs.items()}
    # 4 data sets, and the 2 corrupted sets of the suite (nested under its run)
    assert counts["shard"] == 4 + 2 and counts["corrupt"] == 1
    assert counts["pretrain"] == 1 and counts["report"] == 1
    # Two grids (pre-trained, scratch), each a parent with a run per cell nested under it:
    # 5 modes: zeroshot once, the others per (k, seed), one lr each.
    grids = _role(runs["finetune"], "grid")
    cells = _role(runs["finetune"], "cell")
    assert len(grids) == 2 and len(cells) == (1 + 4 * 2 * 2) + 2 * 2
    assert {c.data.tags["upstream.mode"] for c in cells} == MODES | {"scratch"}
    assert all(c.data.tags["upstream.selected"] == "true" for c in cells)  # one lr each
    # Two evaluation calls, one run per chosen model.
    assert len(_role(runs["evaluate"], "evaluation")) == 2
    assert len(_role(runs["evaluate"], "model")) == len(cells)
    for stage_runs in runs.values():
        assert all(r.info.status == "FINISHED" for r in stage_runs)


def test_metrics_in_range(local_run) -> None:
    runs = _runs_of(local_run)
    models = _role(runs["evaluate"], "model")
    for run in models:
        for key in ("id_top1", "id_macro_f1", "ood_top1", "ood_macro_f1",
                    "ood.corruptions.gaussian_noise-2.top1", "ood.corruptions.top1"):
            assert 0.0 <= run.data.metrics[key] <= 1.0, (key, run.data.metrics)
    # LP on all the digits, even after a tiny pre-training, beats chance (0.1) clearly.
    lp_all = [r for r in models if r.data.tags["upstream.mode"] == "lp"
              and r.data.tags["upstream.shots"] == "0"]
    assert len(lp_all) == 2 and min(r.data.metrics["id_top1"] for r in lp_all) > 0.5
    pretrain = runs["pretrain"][0].data
    assert pretrain.params["pretrain.epochs"] == "3"
    assert "loss" in pretrain.metrics
    grid = _role(runs["finetune"], "grid")
    assert {g.data.params["finetune.shots"] for g in grid} == {"10,0"}


def test_report_is_written_and_shown(local_run) -> None:
    import csv
    import io

    out = local_run.stdout
    report = re.search(r"report: (s3://\S+/report\.html)", out).group(1)
    html = storage.read_bytes(report).decode()
    # accuracy against k, OOD against ID, effective robustness (one source: no spread plot)
    assert html.count("data:image/png;base64,") >= 3
    folder = report.rsplit("/", 1)[0]
    rows = list(csv.DictReader(io.StringIO(storage.read_bytes(
        storage.join(folder, "experiments.csv")).decode())))
    assert len(rows) == len(_role(_runs_of(local_run)["evaluate"], "model"))
    # The Kubeflow UI's artifacts of the report step: the page and its Markdown tables.
    run_dir = Path(re.search(r"pipeline outputs: (\S+)", out).group(1))
    assert (run_dir / "report" / "report").read_text() == html
    assert "|" in (run_dir / "report" / "summary").read_text()


def test_manifest_counts_match_mlflow(local_run) -> None:
    runs = _runs_of(local_run)
    seen = {}
    for run in runs["shard"]:
        manifest_uri = None
        params = run.data.params
        key = (params["shard.source"], params["shard.split"], params["shard.corruption"])
        import mlflow

        manifest = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/manifest.json")
        manifest_uri = manifest["uri"]
        stored = loader.read_manifest(manifest_uri)
        assert stored["num_samples"] == run.data.metrics["num_samples"]
        assert sum(stored["class_counts"].values()) == stored["num_samples"]
        assert manifest_uri.startswith("s3://upstream/")
        seen[key] = stored
    pre = seen[("fractals+shapes", "train", "none")]
    assert pre["num_samples"] == 96 and len(pre["shards"]) >= 4
    counts = pre["class_counts"]
    # 72 fractals over their 4 classes, 24 shapes over theirs: class-balanced within each
    assert sum(v for k, v in counts.items() if k.startswith("fractal-")) == 72
    assert {v for k, v in counts.items() if k.startswith("fractal-")} == {18}
    assert seen[("digits", "test", "none")]["num_samples"] == 360
    assert seen[("digits", "test", "mixed")]["num_samples"] == 360
    train = seen[("digits", "train", "none")]
    assert train["num_samples"] == 1437
    # the 10-shot split fine-tuning used is stored beside the manifest
    stored = storage.read_json(storage.join(train["uri"], "kshot", "k10-seed0.json"))
    assert len(stored["indices"]) == 100
