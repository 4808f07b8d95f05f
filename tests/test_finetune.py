"""Fine-tuning: k shots are k shots, the probe's head is exact, LP-FT learns the digits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from upstream import loader, models
from upstream.errors import UpstreamError
from upstream.finetune import FinetuneConfig, finetune, fit_probe

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")
EXPERIMENT = "upstream-tests"


def _finetune(pretrained: str, data: str, out: Path, **kw: Any) -> dict[str, Any]:
    values = {"pretrained": pretrained, "data": data, "output": str(out), "epochs": 2,
              "batch_size": 32, "experiment": EXPERIMENT} | kw
    return finetune(FinetuneConfig.parse(**values))


def _accuracy(model_uri: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    model = models.classifier_from_model_file(models.load_model_file(model_uri)).eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_probe_sees_exactly_k_shots_and_its_head_is_exact(
    pretrained_digits: dict[str, Any], digits_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    result = _finetune(pretrained_digits["checkpoint"], digits_train, tmp_path / "lp",
                       mode="lp", shots=3, seed=5, epochs=0)
    assert result["num_train"] == result["probe_num_train"] == 3 * 10
    # k=3 leaves a stratified hold-out (one per class) to choose C on.
    assert result["probe_C"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    assert 0 <= result["probe_holdout_accuracy"] <= 1 and "train_accuracy" not in result
    run = mlflow_store.run(result["mlflow_run_id"])
    assert run.data.params["data.num_train"] == "30"
    assert run.data.metrics["probe_C"] == result["probe_C"]
    assert run.data.tags["upstream.mode"] == "lp" and run.data.tags["upstream.shots"] == "3"
    assert mlflow_store.logged_models(result["mlflow_run_id"]) == ["model"]

    # The saved head (the probe folded onto raw features) scores the chosen shots exactly as
    # the probe did.
    images, labels, _ = loader.load_split(digits_train)
    idx = loader.kshot_indices(labels, 3, 5, class_names=[str(i) for i in range(10)])
    acc = _accuracy(result["model"], images[idx], labels[idx])
    assert acc == pytest.approx(result["probe_train_accuracy"])

    saved = torch.load(result["model"], weights_only=True)
    assert saved["format"] == models.MODEL_FORMAT and saved["model_name"] == "upstream-tiny-rn"
    assert saved["class_names"] == loader.read_manifest(digits_train)["class_names"]
    assert saved["head_weight"].shape == (10, 64) and saved["config"]["shots"] == 3
    assert saved["lineage"]["pretrain.method"] == "supervised"
    # LP leaves the tower exactly as pre-trained.
    ckpt = models.load_checkpoint(pretrained_digits["checkpoint"])
    assert all(torch.equal(v, saved["visual"][k]) for k, v in ckpt["visual"].items())


def test_lp_ft_beats_chance_on_digits(
    finetuned_digits: dict[str, Any], pretrained_digits: dict[str, Any], digits_test: str
) -> None:
    assert finetuned_digits["num_train"] == 100
    assert 0.0 < finetuned_digits["final_loss"] < 2.3  # below chance-level cross-entropy
    images, labels, _ = loader.load_split(digits_test)
    assert _accuracy(finetuned_digits["model"], images, labels) > 0.4  # chance: 0.1
    # FT moved the tower.
    saved = models.load_model_file(finetuned_digits["model"])
    ckpt = models.load_checkpoint(pretrained_digits["checkpoint"])
    assert not torch.equal(saved["visual"]["conv1.weight"], ckpt["visual"]["conv1.weight"])


def test_ft_from_a_zero_head(
    pretrained_digits: dict[str, Any], digits_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    result = _finetune(pretrained_digits["checkpoint"], digits_train, tmp_path / "ft",
                       mode="ft", shots=2, epochs=2, lr=1e-3)
    assert result["num_train"] == 20 and "probe_C" not in result
    losses = mlflow_store.history(result["mlflow_run_id"], "ft_loss")
    assert len(losses) == 2
    assert losses[0] == pytest.approx(np.log(10), abs=0.3)  # a zero head starts at ln(classes)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"shots": 31}, "shots=31 but class"),
        ({"pretrained": "MISSING"}, "does not exist"),
        ({"pretrained": "NOT-OURS"}, "not an upstream-checkpoint"),
        ({"mode": "ft", "epochs": 0}, "needs epochs"),
        ({"lr": -0.1}, "invalid lr"),
        ({"data": "MISSING"}, "manifest.json missing"),
    ],
)
def test_bad_input_fails_in_one_line_before_compute(
    kw: dict[str, Any], message: str, digits_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    # A missing checkpoint everywhere: the other checks must come before loading it.
    pretrained = str(tmp_path / "no-checkpoint")
    if kw.get("pretrained") == "NOT-OURS":
        torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
        kw["pretrained"] = str(tmp_path / "foreign.pt")
    kw.setdefault("pretrained", pretrained)
    if kw.get("data") == "MISSING":
        kw["data"] = str(tmp_path / "no-shards")
    kw.setdefault("data", digits_train)
    experiment = f"bad-finetune-{next(iter(kw))}"
    with pytest.raises(UpstreamError) as e:
        _finetune(out=tmp_path / "out", experiment=experiment, **kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert mlflow_store.no_run_in(experiment)
    assert not (tmp_path / "out").exists()


def test_probe_head_reproduces_sklearn_and_handles_edge_cases() -> None:
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    # Features with very different scales per dimension, 3 present classes out of 4.
    centres = rng.normal(size=(3, 8)) * 3
    x = np.concatenate([rng.normal(c, 1.0, size=(6, 8)) for c in centres])
    x = x * np.array([100, 1, 1, 0.01, 1, 1, 1, 1])
    y = np.repeat([0, 1, 3], 6)
    probe = fit_probe(x, y, num_classes=4, seed=0)
    logits = torch.tensor(x, dtype=torch.float32) @ probe["weight"].T + probe["bias"]
    pred = logits.argmax(1).numpy()
    assert 2 not in pred  # the absent class is never predicted
    assert probe["C"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    assert (pred == y).mean() == pytest.approx(probe["train_accuracy"])
    # Same predictions as sklearn's own probe with that C on the same scaled features.
    mu = x.mean(0)
    sigma = np.sqrt(((x - mu) ** 2).sum(1).mean() / x.shape[1])
    ref = LogisticRegression(C=probe["C"], max_iter=1000).fit((x - mu) / sigma, y)
    assert (ref.predict((x - mu) / sigma) == pred).all()

    # Two classes: sklearn keeps one row of weights; the head still gets two.
    yb = (y > 0).astype(int)
    binary = fit_probe(x, yb, num_classes=2, seed=0)
    logits = torch.tensor(x, dtype=torch.float32) @ binary["weight"].T + binary["bias"]
    assert binary["weight"].shape == (2, 8)
    assert (logits.argmax(1).numpy() == yb).mean() == pytest.approx(binary["train_accuracy"])

    # One shot per class: no hold-out to choose C with.
    one = fit_probe(x[::6], y[::6], num_classes=4, seed=0)
    assert one["C"] == 1.0 and np.isnan(one["holdout_accuracy"])
    with pytest.raises(UpstreamError, match="fewer than 2 classes"):
        fit_probe(x[:6], y[:6], num_classes=4, seed=0)
