"""End to end: `upstream run transfer --local` on the real local S3 server and MLflow server.

The whole pipeline runs through kfp.local's SubprocessRunner, exactly as `make demo` does,
with tiny settings; the assertions read what MLflow and S3 hold afterwards.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from upstream import loader, storage

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
    "--finetune-shots": "10",
    "--finetune-epochs": "2",
    "--finetune-batch-size": "16",
    "--experiment": "e2e",
}


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


def test_mlflow_holds_a_run_per_stage(local_run) -> None:
    runs = _runs_of(local_run)
    assert {stage: len(r) for stage, r in runs.items()} == {
        "shard": 4, "pretrain": 1, "finetune": 1, "evaluate": 1,
    }
    for stage_runs in runs.values():
        assert all(r.info.status == "FINISHED" for r in stage_runs)


def test_metrics_in_range(local_run) -> None:
    runs = _runs_of(local_run)
    metrics = runs["evaluate"][0].data.metrics
    for key in ("id_top1", "id_macro_f1", "ood_top1", "ood_macro_f1"):
        assert 0.0 <= metrics[key] <= 1.0, (key, metrics[key])
    # 10 shots of 10 digits, even after a tiny pre-training, beat chance (0.1) clearly.
    assert metrics["id_top1"] > 0.3
    pretrain = runs["pretrain"][0].data
    assert pretrain.params["pretrain.epochs"] == "3"
    assert "loss" in pretrain.metrics
    finetune = runs["finetune"][0].data
    assert finetune.params["finetune.shots"] == "10"


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
