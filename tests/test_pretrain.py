"""Pre-training: both methods learn, the checkpoint and the MLflow run hold what they say."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from upstream import models
from upstream.errors import UpstreamError
from upstream.pretrain import PretrainConfig, pretrain
from upstream.shards import loader

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")
EXPERIMENT = "upstream-tests"


def _pretrain(data: str, out: Path, **kw: Any) -> dict[str, Any]:
    values = {"data": data, "output": str(out), "epochs": 8, "batch_size": 16,
              "warmup_steps": 3, "experiment": EXPERIMENT} | kw
    return pretrain(PretrainConfig.parse(**values))


@pytest.mark.parametrize("method", ["clip", "supervised"])
def test_loss_decreases_and_everything_is_recorded(
    method: str, shapes_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    result = _pretrain(shapes_train, tmp_path / "out", method=method, lr=2e-3)
    # 64 samples / batch 16 × 8 epochs.
    assert result["steps"] == 32
    losses = mlflow_store.history(result["mlflow_run_id"], "loss")
    assert len(losses) == 32
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # A 15% drop in 32 steps: an untrained or broken step leaves the loss flat (CLIP's stays
    # at log 16 ≈ 2.77); the sample order (seeded) decides how much further it falls.
    assert last < 0.85 * first, (first, last)
    assert result["final_loss"] == pytest.approx(sum(losses[-10:]) / 10)
    assert result["samples_per_s"] > 0

    ckpt = torch.load(result["checkpoint"], weights_only=True)
    assert result["checkpoint"] == str(tmp_path / "out" / "checkpoint.pt")
    assert ckpt["format"] == models.CHECKPOINT_FORMAT and ckpt["method"] == method
    assert ckpt["model_name"] == "upstream-tiny-rn" and ckpt["image_size"] == 32
    assert ckpt["class_names"] == ["circle", "square", "triangle", "pentagon"]
    assert ckpt["config"]["lr"] == 2e-3
    assert ("clip" in ckpt) == (method == "clip") and ("head_weight" in ckpt) != (method == "clip")
    assert "ModifiedResNet" in ckpt["architecture"]
    # The saved tower is the trained one, not a fresh initialisation.
    fresh = models.build_image_encoder("upstream-tiny-rn").visual.state_dict()
    assert not torch.equal(ckpt["visual"]["conv1.weight"], fresh["conv1.weight"])
    models.encoder_from_state("upstream-tiny-rn", ckpt["visual"])

    run = mlflow_store.run(result["mlflow_run_id"])
    manifest = loader.read_manifest(shapes_train)
    assert run.data.params["data.fingerprint"] == manifest["fingerprint"]
    assert run.data.params["data.num_samples"] == "64"
    assert run.data.params["pretrain.method"] == method
    assert run.data.tags["upstream.method"] == method
    assert run.data.tags["upstream.source"] == "shapes"
    assert {"loss", "lr", "samples_per_s"} <= set(run.data.metrics)
    lrs = mlflow_store.history(result["mlflow_run_id"], "lr")
    assert max(lrs) == pytest.approx(2e-3, rel=0.01) and lrs[0] < lrs[3] and lrs[-1] < 2e-4
    assert "loss_curve.png" in mlflow_store.artifacts(result["mlflow_run_id"])
    assert mlflow_store.logged_models(result["mlflow_run_id"]) == ["model"]


def test_logged_model_takes_unit_images(shapes_train: str, tmp_path: Path) -> None:
    result = _pretrain(shapes_train, tmp_path / "out", method="clip", epochs=1)
    # A torch.export graph (no pickle), with the encoder's parameter names and a free batch.
    logged = models.load_mlflow_model(f"runs:/{result['mlflow_run_id']}/model")
    with torch.no_grad():
        assert logged(torch.rand(3, 3, 32, 32)).shape == (3, 64)
    # Same weights as the checkpoint's tower.
    ckpt = models.load_checkpoint(result["checkpoint"])
    assert torch.equal(logged.state_dict()["visual.conv1.weight"], ckpt["visual"]["conv1.weight"])


def test_same_seed_same_checkpoint(shapes_train: str, tmp_path: Path) -> None:
    a = _pretrain(shapes_train, tmp_path / "a", method="supervised", epochs=1)
    b = _pretrain(shapes_train, tmp_path / "b", method="supervised", epochs=1)
    c = _pretrain(shapes_train, tmp_path / "c", method="supervised", epochs=1, seed=1)
    wa, wb, wc = (models.load_checkpoint(r["checkpoint"])["visual"]["conv1.weight"]
                  for r in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"lr": -1.0}, "invalid lr"),
        ({"epochs": 0}, "invalid epochs"),
        ({"method": "byol"}, "invalid method"),
        ({"model": "RN5O"}, "unknown model 'RN5O'"),
        ({"data": "MISSING"}, "manifest.json missing"),
        ({"procs_per_node": 3}, "batch_size 16 is not divisible by 3 process(es)"),
        ({"accum_steps": 16}, "fewer than 2 samples per micro-batch"),
        ({"precision": "fp16"}, "fp16 needs a GPU"),
        ({"resume": "/nowhere/state/step-00000004.pt"}, "does not exist"),
        ({"nodes": 2}, "runs as a Kubeflow PyTorchJob"),
    ],
)
def test_bad_input_fails_in_one_line_before_any_run(
    kw: dict[str, Any], message: str, shapes_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    experiment = f"bad-{next(iter(kw))}"
    data = str(tmp_path / "no-shards") if kw.pop("data", None) == "MISSING" else shapes_train
    with pytest.raises(UpstreamError) as e:
        _pretrain(data, tmp_path / "out", experiment=experiment, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert mlflow_store.no_run_in(experiment)
    assert not (tmp_path / "out").exists()


def test_checkpoint_to_s3(moto_s3: str, shapes_train: str) -> None:
    from upstream import storage

    result = _pretrain(shapes_train, Path("unused"), output=f"s3://{moto_s3}/pt/run1",
                       method="supervised", epochs=1)
    assert result["checkpoint"] == f"s3://{moto_s3}/pt/run1/checkpoint.pt"
    assert list(storage.list_files(f"s3://{moto_s3}/pt")) == [result["checkpoint"]]
    assert models.load_checkpoint(f"s3://{moto_s3}/pt/run1")["method"] == "supervised"


def test_missing_bucket_fails_fast(moto_s3: str, shapes_train: str, mlflow_store: Any) -> None:
    with pytest.raises(UpstreamError, match="does not exist"):
        _pretrain(shapes_train, Path("unused"), output="s3://no-such-bucket/pt",
                  experiment="bad-bucket")
    assert mlflow_store.no_run_in("bad-bucket")


def test_training_state_on_s3_resumes(moto_s3: str, shapes_train: str) -> None:
    """State objects and the ``latest`` pointer live on S3 like everything else; a run whose
    final checkpoint is gone resumes from the pointer and ends with the same weights."""
    from upstream import storage
    from upstream.pretrain import trainstate

    out = f"s3://{moto_s3}/pt/state-run"
    kw = dict(output=out, method="supervised", epochs=2, checkpoint_every=3)
    first = _pretrain(shapes_train, Path("unused"), **kw)  # 8 steps: states at 3 and 6
    state = trainstate.state_dir(out)
    assert storage.read_bytes(f"{state}/latest") == b"step-00000006.pt"
    assert sorted(storage.list_files(state)) == [
        f"{state}/latest", f"{state}/step-00000003.pt", f"{state}/step-00000006.pt"]
    storage.remove_file(first["checkpoint"])
    again = _pretrain(shapes_train, Path("unused"), **kw)
    assert again["resumed"] == f"{state}/step-00000006.pt" and again["steps"] == 8
    a, b = (models.load_checkpoint(r["checkpoint"])["visual"] for r in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Complete: a third call does nothing and says so.
    assert _pretrain(shapes_train, Path("unused"), **kw)["resumed"] == "complete"
