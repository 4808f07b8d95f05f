"""Evaluation: scores in range, confusion matrices that add up, class checks before compute."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from upstream import loader
from upstream.errors import UpstreamError
from upstream.evaluate import EvaluateConfig, evaluate, scores

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")
EXPERIMENT = "upstream-tests"


def test_id_and_ood_scores(
    finetuned_digits: dict[str, Any],
    digits_test: str,
    digits_test_rotated: str,
    mlflow_store: Any,
    tmp_path: Path,
) -> None:
    result = evaluate(EvaluateConfig.parse(
        model=finetuned_digits["model"], id_data=digits_test, ood_data=digits_test_rotated,
        batch_size=64, experiment=EXPERIMENT,
    ))
    names = loader.read_manifest(digits_test)["class_names"]
    assert result["class_names"] == names
    for which, uri in (("id", digits_test), ("ood", digits_test_rotated)):
        r = result[which]
        n = loader.read_manifest(uri)["num_samples"]
        assert r["num_samples"] == n == 200
        cm = np.array(r["confusion_matrix"])
        assert cm.shape == (10, 10) and cm.sum() == n
        assert (cm.sum(1) == 20).all()  # rows are the true classes: 20 test images each
        assert r["top1"] == pytest.approx(np.trace(cm) / n)
        assert 0 <= r["macro_f1"] <= 1 and set(r["per_class_f1"]) == set(names)
        assert r["macro_f1"] == pytest.approx(np.mean(list(r["per_class_f1"].values())))
    assert result["id"]["top1"] > 0.4  # LP-FT on 10 shots beats chance (0.1) on the digits
    assert result["ood"]["top1"] < result["id"]["top1"]  # rotation hurts

    run = mlflow_store.run(result["mlflow_run_id"])
    for key in ("id_top1", "id_macro_f1", "ood_top1", "ood_macro_f1"):
        which, metric = key.split("_", 1)
        assert run.data.metrics[key] == pytest.approx(result[which][metric])
    assert run.data.tags["upstream.method"] == "supervised"
    assert run.data.tags["upstream.shots"] == "10"
    assert run.data.params["lineage.finetune.mode"] == "lp-ft"
    artifacts = mlflow_store.artifacts(result["mlflow_run_id"])
    assert {"confusion_id.png", "confusion_ood.png", "results.json"} <= artifacts

    from mlflow.artifacts import download_artifacts

    saved = download_artifacts(run_id=result["mlflow_run_id"], artifact_path="results.json",
                               dst_path=str(tmp_path))
    logged = json.loads(Path(saved).read_text())
    assert logged["id"]["confusion_matrix"] == result["id"]["confusion_matrix"]


def test_macro_f1_counts_only_the_classes_present() -> None:
    labels = np.array([0, 0, 1, 1])
    preds = np.array([0, 0, 1, 2])
    r = scores(labels, preds, ["a", "b", "c"])
    assert r["top1"] == 0.75
    assert r["per_class_f1"] == pytest.approx({"a": 1.0, "b": 2 / 3})
    assert r["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)  # not over "c", absent
    assert r["confusion_matrix"] == [[2, 0, 0], [0, 1, 1], [0, 0, 0]]


@pytest.mark.parametrize("which", ["id_data", "ood_data"])
def test_other_classes_fail_before_compute(
    which: str,
    finetuned_digits: dict[str, Any],
    digits_test: str,
    shapes_train: str,
    mlflow_store: Any,
) -> None:
    values = {"model": finetuned_digits["model"], "id_data": digits_test,
              "ood_data": digits_test, "experiment": f"bad-eval-{which}"}
    values[which] = shapes_train
    with pytest.raises(UpstreamError) as e:
        evaluate(EvaluateConfig.parse(**values))
    assert f"{which} {shapes_train} has classes [circle" in str(e.value)
    assert "\n" not in str(e.value)
    assert mlflow_store.no_run_in(f"bad-eval-{which}")


def test_missing_model_fails_fast(digits_test: str, tmp_path: Path, mlflow_store: Any) -> None:
    with pytest.raises(UpstreamError, match="does not exist"):
        evaluate(EvaluateConfig.parse(model=str(tmp_path / "nothing"), id_data=digits_test,
                                      ood_data=digits_test, experiment="bad-eval-model"))
    assert mlflow_store.no_run_in("bad-eval-model")
