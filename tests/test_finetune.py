"""Fine-tuning grids: every mode, nested MLflow runs, the choice on the validation split, the
feature cache, presets, the scratch baseline and bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from upstream import models
from upstream.errors import UpstreamError
from upstream.finetune import FinetuneConfig, finetune, fit_probe, read_grid
from upstream.finetune import splits as splits_mod
from upstream.finetune.config import PRESETS
from upstream.shards import loader

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")
EXPERIMENT = "upstream-tests"


def _finetune(data: str, out: Path, **kw: Any) -> dict[str, Any]:
    values = {"data": data, "output": str(out), "epochs": 2, "batch_size": 32, "min_steps": 0,
              "experiment": EXPERIMENT} | kw
    return finetune(FinetuneConfig.parse(**values))


def _accuracy(model_uri: str, images: torch.Tensor, labels: torch.Tensor) -> float:
    model = models.classifier_from_model_file(models.load_model_file(model_uri)).eval()
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def _children(mlflow_store: Any, parent_id: str) -> list[Any]:
    import mlflow

    run = mlflow_store.run(parent_id)
    return mlflow.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'",
        output_format="list",
    )


@pytest.fixture(scope="module")
def grid(pretrained_digits: dict[str, Any], digits_train: str,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """lp, lp-ft and ft over k ∈ {2, 0} × 2 seeds × 2 learning rates: 2·2·(1 + 2 + 2) cells."""
    out = tmp_path_factory.mktemp("grid")
    cache = tmp_path_factory.mktemp("features")
    result = _finetune(digits_train, out / "g", pretrained=pretrained_digits["checkpoint"],
                       modes="lp,lp-ft,ft", shots="2,0", seeds="0,1", lrs="1e-4,1e-3",
                       val_per_class=5, probe_c_points=6, feature_cache=str(cache))
    return result | {"cache": cache, "out": out}


def test_grid_nests_a_run_per_cell_and_chooses_on_validation(
    grid: dict[str, Any], mlflow_store: Any, digits_train: str
) -> None:
    assert grid["num_cells"] == 2 * 2 * (1 + 2 + 2) == 20
    children = _children(mlflow_store, grid["mlflow_run_id"])
    assert len(children) == 20
    parent = mlflow_store.run(grid["mlflow_run_id"])
    assert parent.data.tags["upstream.role"] == "grid"
    assert {"selection.json", "val_vs_k.png", "val_vs_lr.png", "loss_curves.png"} <= \
        mlflow_store.artifacts(grid["mlflow_run_id"])

    groups: dict[tuple[str, str, str], list[Any]] = {}
    for run in children:
        t = run.data.tags
        assert t["upstream.role"] == "cell" and t["upstream.stage"] == "finetune"
        groups.setdefault((t["upstream.mode"], t["upstream.shots"], t["upstream.seed"]),
                          []).append(run)
    assert len(groups) == 2 * 2 * 3
    for (mode, _, _), runs in groups.items():
        assert len(runs) == (1 if mode == "lp" else 2)
        chosen = [r for r in runs if r.data.tags["upstream.selected"] == "true"]
        assert len(chosen) == 1
        best = max(r.data.metrics["val_top1"] for r in runs)
        assert chosen[0].data.metrics["val_top1"] == best  # never a test set
        assert mlflow_store.logged_models(chosen[0].info.run_id) == ["model"]
    # The validation split is disjoint from the k shots and has val_per_class per class.
    k2 = [r for r in children if r.data.tags["upstream.shots"] == "2"]
    assert {r.data.params["cell.num_train"] for r in k2} == {"20"}
    assert {r.data.params["cell.num_val"] for r in children} == {"50"}

    stored = read_grid(grid["grid"])
    assert len(stored["selected"]) == len(groups)
    images, labels, _ = loader.load_split(digits_train)
    for s in stored["selected"]:
        saved = models.load_model_file(s["model"])
        assert saved["lineage"]["finetune.mode"] == s["mode"]
        assert saved["lineage"]["finetune.mlflow_run_id"] == s["run_id"]
        # The model file scores the validation split as the run recorded.
        split = splits_mod.draw(labels.numpy(), s["shots"], s["seed"], 5)
        acc = _accuracy(s["model"], images[split.val], labels[split.val])
        assert acc == pytest.approx(s["val_top1"], abs=1e-6)
        assert not set(split.train) & set(split.val)


def test_probe_chooses_c_on_validation_and_its_head_is_exact(
    grid: dict[str, Any], mlflow_store: Any, digits_train: str
) -> None:
    lp = [s for s in read_grid(grid["grid"])["selected"] if s["mode"] == "lp"]
    c_grid = FinetuneConfig.parse(data="-", pretrained="-", probe_c_points=6).c_grid
    for s in lp:
        history = mlflow_store.history(s["run_id"], "probe_val_accuracy")
        assert len(history) == 6
        assert s["C"] == pytest.approx(c_grid[int(np.argmax(history))])  # first of the best
    # LP leaves the tower as pre-trained; LP-FT starts from the probe of the same (k, seed).
    saved = models.load_model_file(lp[0]["model"])
    assert saved["lineage"]["finetune.C"]


def test_a_later_call_reuses_the_stored_features(
    grid: dict[str, Any], pretrained_digits: dict[str, Any], digits_train: str
) -> None:
    first = read_grid(grid["grid"])
    assert first["features_cached"] is False
    cached = list(Path(grid["cache"]).glob("*.pt"))
    assert len(cached) == 1
    again = _finetune(digits_train, grid["out"] / "again", pretrained=pretrained_digits[
        "checkpoint"], modes="lp", shots="3", seeds="0", val_per_class=5, probe_c_points=6,
        feature_cache=str(grid["cache"]))
    assert read_grid(again["grid"])["features_cached"] is True
    # What the cache holds is what the tower computes now.
    from upstream.finetune.features import extract_features

    ckpt = models.load_checkpoint(pretrained_digits["checkpoint"])
    encoder = models.encoder_from_state(ckpt["model_name"], ckpt["visual"])
    images, _, _ = loader.load_split(digits_train)
    stored = torch.load(cached[0], weights_only=True)["features"]
    assert torch.allclose(stored, extract_features(encoder, images), atol=1e-5)


def test_the_same_grid_again_is_a_no_op(grid: dict[str, Any], pretrained_digits: dict[str, Any],
                                        digits_train: str, mlflow_store: Any) -> None:
    again = _finetune(digits_train, grid["out"] / "g", pretrained=pretrained_digits[
        "checkpoint"], modes="lp,lp-ft,ft", shots="2,0", seeds="0,1", lrs="1e-4,1e-3",
        val_per_class=5, probe_c_points=6, feature_cache=str(grid["cache"]))
    assert again["reused"] and again["mlflow_run_id"] == grid["mlflow_run_id"]


def test_ft_from_a_zero_head_starts_at_chance_loss(
    pretrained_digits: dict[str, Any], digits_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    result = _finetune(digits_train, tmp_path / "ft", pretrained=pretrained_digits["checkpoint"],
                       modes="ft", shots="2", lrs="1e-3", epochs=2, val_per_class=3)
    (s,) = result["selected"]
    losses = mlflow_store.history(s["run_id"], "ft_loss")
    assert len(losses) == 2
    assert losses[0] == pytest.approx(np.log(10), abs=0.3)  # a zero head starts at ln(classes)


def test_zero_shot_head_is_the_text_towers_and_scores_without_training(
    pretrained_clip_digits: dict[str, Any], digits_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    import open_clip

    result = _finetune(digits_train, tmp_path / "zs",
                       pretrained=pretrained_clip_digits["checkpoint"],
                       modes="zeroshot,zeroshot-ft", shots="5", lrs="1e-4", templates="simple",
                       val_per_class=3)
    by_mode = {s["mode"]: s for s in result["selected"]}
    assert set(by_mode) == {"zeroshot", "zeroshot-ft"}
    zs = models.load_model_file(by_mode["zeroshot"]["model"])
    assert zs["normalize"] is True and zs["lineage"]["finetune.shots"] == "none"
    # The head is open_clip's zero-shot classifier of the class names, times logit_scale.
    ckpt = models.load_checkpoint(pretrained_clip_digits["checkpoint"])
    clip = models.build_clip(ckpt["model_name"])
    clip.load_state_dict(ckpt["clip"])
    names = loader.read_manifest(digits_train)["class_names"]
    ref = open_clip.build_zero_shot_classifier(
        clip, open_clip.get_tokenizer(ckpt["model_name"]), names, ["a photo of a {}."])
    scale = clip.logit_scale.exp().item()
    assert torch.allclose(zs["head_weight"], (ref.T * scale).float(), atol=1e-4)
    # zeroshot is scored on the whole training set (it uses no label): its accuracy there.
    images, labels, _ = loader.load_split(digits_train)
    assert _accuracy(by_mode["zeroshot"]["model"], images, labels) == pytest.approx(
        by_mode["zeroshot"]["val_top1"], abs=1e-6)
    ft = models.load_model_file(by_mode["zeroshot-ft"]["model"])
    assert ft["normalize"] is True
    assert not torch.equal(ft["head_weight"], zs["head_weight"])  # fine-tuned from it


def test_scratch_learns_the_task_and_is_not_registered(
    digits_train: str, digits_test: str, tmp_path: Path, training_home: Path
) -> None:
    """Full-shot scratch comes near the same tower trained on the task by supervised
    pre-training with the same budget, and registers nothing."""
    from mlflow.tracking import MlflowClient

    from upstream import tracking
    from upstream.pretrain import PretrainConfig, pretrain

    client = MlflowClient(tracking.tracking_uri())
    before = {m.name: len(client.search_model_versions(f"name = '{m.name}'"))
              for m in client.search_registered_models()}
    result = _finetune(digits_train, tmp_path / "scratch", modes="scratch",
                       model="upstream-tiny-rn", shots="0", lrs="2e-3", epochs=15,
                       val_per_class=3)
    (s,) = result["selected"]
    saved = models.load_model_file(s["model"])
    assert saved["lineage"]["pretrain.method"] == "none"
    after = {m.name: len(client.search_model_versions(f"name = '{m.name}'"))
             for m in client.search_registered_models()}
    assert after == before

    images, labels, _ = loader.load_split(digits_test)
    scratch_acc = _accuracy(s["model"], images, labels)
    task = pretrain(PretrainConfig.parse(
        data=digits_train, output=str(tmp_path / "task"), method="supervised", epochs=15,
        batch_size=32, lr=2e-3, weight_decay=0.0, warmup_steps=10, experiment="task-baseline",
        registered_model="task-baseline"))
    ckpt = models.load_checkpoint(task["checkpoint"])
    net = models.Classifier(models.encoder_from_state(ckpt["model_name"], ckpt["visual"]), 10)
    net.head.load_state_dict({"weight": ckpt["head_weight"], "bias": ckpt["head_bias"]})
    with torch.no_grad():
        task_acc = (net.eval()(images).argmax(1) == labels).float().mean().item()
    assert task_acc > 0.6  # the reference itself learned
    assert scratch_acc > task_acc - 0.1, (scratch_acc, task_acc)


def test_a_diverging_learning_rate_is_recorded_and_left_out(
    pretrained_digits: dict[str, Any], digits_train: str, tmp_path: Path, mlflow_store: Any
) -> None:
    result = _finetune(digits_train, tmp_path / "div", pretrained=pretrained_digits["checkpoint"],
                       modes="ft", shots="3", lrs="1e-4,1e30", optimizer="sgd", epochs=3,
                       val_per_class=3)
    (s,) = result["selected"]
    assert s["lr"] == 1e-4
    runs = {r.data.tags["upstream.lr"]: r for r in _children(mlflow_store, result["mlflow_run_id"])}
    assert runs["1e+30"].data.tags["upstream.diverged"] == "true"
    assert runs["1e+30"].info.status == "FAILED"
    assert runs["1e+30"].data.tags["upstream.selected"] == "false"


def test_presets_set_defaults_that_fields_override() -> None:
    base = {"data": "-", "pretrained": "-"}
    entezari = FinetuneConfig.parse(preset="entezari", **base)
    r = entezari.recipe()
    assert (r.optimizer, r.weight_decay, r.batch_size, r.warmup_steps, r.batchnorm) == \
        ("adamw", 0.1, 128, 500, "train")
    assert entezari.lr_list == [1e-4, 3e-4, 1e-3, 3e-3]
    # A few-shot run shorter than the paper's warmup still gets its cosine decay.
    assert r.warmup_for(10_000) == 500 and r.warmup_for(128) == 12
    kumar = FinetuneConfig.parse(preset="kumar", weight_decay=0.01, batch_size=16, **base)
    r = kumar.recipe()
    assert (r.optimizer, r.weight_decay, r.batch_size, r.batchnorm) == ("sgd", 0.01, 16, "frozen")
    assert kumar.lr_list == list(PRESETS["kumar"].lrs)
    default = FinetuneConfig.parse(lrs="1e-3,1e-2", batchnorm="train", **base).recipe()
    assert (default.optimizer, default.weight_decay, default.batchnorm) == ("adamw", 0.0, "train")
    scratch = FinetuneConfig.parse(data="-", modes="scratch", model="upstream-tiny-rn")
    assert scratch.recipe().batchnorm == "train" and scratch.lr_list == [1e-3]

    from upstream.finetune.train import make_optimizer

    net = models.Classifier(models.build_image_encoder("upstream-tiny-rn"), 3)
    assert isinstance(make_optimizer(net, kumar.recipe(), 0.1, vit=False), torch.optim.SGD)
    assert isinstance(make_optimizer(net, entezari.recipe(), 0.1, vit=False), torch.optim.AdamW)


def test_validation_split_at_k1_and_full_shot() -> None:
    labels = np.repeat(np.arange(4), 8)
    one = splits_mod.draw(labels, 1, seed=3, val_per_class=2)
    assert len(one.train) == 4 and len(one.val) == 8
    assert not set(one.train) & set(one.val)
    assert sorted(np.bincount(labels[one.val])) == [2, 2, 2, 2]
    # The k-shot sample is the shard stage's (loader.kshot_indices) for the same (k, seed).
    assert list(one.train) == loader.kshot_indices(labels, 1, 3)
    full = splits_mod.draw(labels, 0, seed=3, val_per_class=2)
    assert len(full.train) == 32 - 8 and not set(full.train) & set(full.val)
    other_seed = splits_mod.draw(labels, 1, seed=4, val_per_class=2)
    assert list(other_seed.val) != list(one.val)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"shots": "1,25"}, "k=25 shots + 10 validation examples per class need 35 images"),
        ({"shots": "0", "val_per_class": 30}, "full-shot training + 30 validation"),
        ({"pretrained": "MISSING"}, "does not exist"),
        ({"pretrained": "NOT-OURS"}, "not an upstream-checkpoint"),
        ({"modes": "zeroshot-ft", "pretrained": "SUPERVISED"}, "need a CLIP checkpoint"),
        ({"modes": "scratch", "model": "upstream-tiny-rn", "pretrained": "SUPERVISED"},
         "scratch takes model (a tower name), not a pre-trained checkpoint"),
        ({"lrs": "1e-3,0"}, "invalid lrs: learning rates must be positive"),
        ({"lrs": "1e-3,-1e-2"}, "invalid lrs: learning rates must be positive"),
        ({"modes": "lp,probe"}, "invalid modes: unknown mode 'probe'"),
        ({"data": "MISSING"}, "manifest.json missing"),
    ],
)
def test_bad_input_fails_in_one_line_before_compute(
    kw: dict[str, Any], message: str, digits_train: str, tmp_path: Path, mlflow_store: Any,
    pretrained_digits: dict[str, Any],
) -> None:
    # A missing checkpoint by default: the other checks must come before loading it.
    kw = dict(kw)
    pretrained = {"MISSING": str(tmp_path / "no-checkpoint"),
                  "SUPERVISED": pretrained_digits["checkpoint"]}
    if kw.get("pretrained") == "NOT-OURS":
        torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
        kw["pretrained"] = str(tmp_path / "foreign.pt")
    kw["pretrained"] = pretrained.get(kw.get("pretrained", "MISSING"), kw.get("pretrained"))
    if kw.get("data") == "MISSING":
        kw["data"] = str(tmp_path / "no-shards")
    data = kw.pop("data", digits_train)
    experiment = f"bad-finetune-{len(message)}"
    with pytest.raises(UpstreamError) as e:
        _finetune(data, tmp_path / "out", experiment=experiment, **kw)
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
    xv = np.concatenate([rng.normal(c, 1.0, size=(4, 8)) for c in centres])
    xv = xv * np.array([100, 1, 1, 0.01, 1, 1, 1, 1])
    yv = np.repeat([0, 1, 3], 4)
    grid = [1e-3, 1e-1, 10.0]
    probe = fit_probe(x, y, num_classes=4, c_grid=grid, val_features=xv, val_labels=yv)
    logits = torch.tensor(x, dtype=torch.float32) @ probe["weight"].T + probe["bias"]
    pred = logits.argmax(1).numpy()
    assert 2 not in pred  # the absent class is never predicted
    assert probe["C"] in grid and len(probe["path"]) == 3
    best = max(probe["path"], key=lambda p: (p["val_accuracy"], -p["val_loss"]))
    assert probe["C"] == best["C"]
    assert (pred == y).mean() == pytest.approx(probe["train_accuracy"])
    # Same predictions as sklearn's own probe with that C on the same scaled features.
    mu = x.mean(0)
    sigma = np.sqrt(((x - mu) ** 2).sum(1).mean() / x.shape[1])
    ref = LogisticRegression(C=probe["C"], max_iter=1000).fit((x - mu) / sigma, y)
    assert (ref.predict((x - mu) / sigma) == pred).all()
    vlogits = torch.tensor(xv, dtype=torch.float32) @ probe["weight"].T + probe["bias"]
    assert (vlogits.argmax(1).numpy() == yv).mean() == pytest.approx(probe["val_accuracy"])

    # Two classes: sklearn keeps one row of weights; the head still gets two.
    yb = (y > 0).astype(int)
    binary = fit_probe(x, yb, num_classes=2)
    logits = torch.tensor(x, dtype=torch.float32) @ binary["weight"].T + binary["bias"]
    assert binary["weight"].shape == (2, 8)
    assert (logits.argmax(1).numpy() == yb).mean() == pytest.approx(binary["train_accuracy"])
    with pytest.raises(UpstreamError, match="needs a validation split"):
        fit_probe(x, y, num_classes=4, c_grid=grid)
    with pytest.raises(UpstreamError, match="fewer than 2 classes"):
        fit_probe(x[:6], y[:6], num_classes=4)


def test_selection_table_is_logged(grid: dict[str, Any], tmp_path: Path) -> None:
    from mlflow.artifacts import download_artifacts

    path = download_artifacts(run_id=grid["mlflow_run_id"], artifact_path="selection.json",
                              dst_path=str(tmp_path))
    table = json.loads(Path(path).read_text())
    assert len(table["cells"]) == 20
    assert sum(c["selected"] for c in table["cells"]) == len(table["selected"]) == 12
