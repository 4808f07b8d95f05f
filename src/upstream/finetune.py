"""Fine-tuning stage: LP-FT on k examples per class.

LP: a logistic-regression probe on frozen features. FT: full fine-tuning of the image tower
with a linear head initialised from the probe (Kumar et al., 2022)."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from upstream.config import StageConfig, wiring
from upstream.errors import UpstreamError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from torch import nn

    from upstream.models import Classifier

log = logging.getLogger(__name__)

#: Inverse regularisation strengths the probe chooses from (on standardised features).
PROBE_C_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
#: Fraction of the k-shot set held out to choose C (at least one example per class).
HOLDOUT_FRACTION = 0.2
FEATURE_BATCH = 256


class FinetuneConfig(StageConfig):
    stage: ClassVar[str] = "finetune"

    pretrained: str = wiring(description="Pre-trained checkpoint (file or its folder).")
    data: str = wiring(description="Downstream training shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the fine-tuned model goes.")
    mode: Literal["lp-ft", "lp", "ft"] = Field(
        "lp-ft", description="lp: probe only; ft: full fine-tuning from a zero head; lp-ft: both."
    )
    shots: int = Field(0, ge=0, description="Training examples per class (k); 0 = all (full-shot).")
    seed: int = Field(0, description="Seed for the k-shot sample and training.")
    epochs: int = Field(10, ge=0, description="Full fine-tuning epochs.")
    batch_size: int = Field(64, ge=1, description="Samples per fine-tuning step.")
    lr: float = Field(
        1e-5,
        gt=0,
        description="Peak fine-tuning learning rate (AdamW, short warmup, cosine). Every "
        "weight moves by about lr per step under Adam, so a tower that fine-tunes well at "
        "1e-5 can lose its probe's accuracy in one step at 1e-3.",
    )
    weight_decay: float = Field(0.0, ge=0, description="Fine-tuning weight decay.")
    experiment: str = Field("upstream", description="MLflow experiment name.")


def stored_kshot(data: str, shots: int, seed: int) -> list[int] | None:
    """The k-shot split the shard stage stored beside ``data``'s manifest, if it did.

    Stored lists come from :func:`upstream.loader.kshot_indices` with the same arguments, so
    reading one gives the same images as drawing them here; it only saves decoding the rest.
    """
    from upstream import storage

    uri = storage.join(data, "kshot", f"k{shots}-seed{seed}.json")
    if not storage.exists(uri):
        return None
    stored = storage.read_json(uri)
    return [int(i) for i in stored["indices"]]


def check_shots(manifest: dict[str, Any], shots: int, data: str) -> None:
    """Raise when ``shots`` exceeds the smallest class, from the manifest's class counts."""
    if not shots:
        return
    names = [str(c) for c in manifest.get("class_names", [])]
    counts = manifest.get("class_counts")
    if isinstance(counts, dict):
        pairs = [(str(k), int(v)) for k, v in counts.items()]
    elif isinstance(counts, list) and len(counts) == len(names):
        pairs = [(n, int(c)) for n, c in zip(names, counts, strict=True)]
    else:
        return  # no counts recorded: kshot_indices checks once the labels are loaded
    name, smallest = min(pairs, key=lambda p: p[1])
    if shots > smallest:
        raise UpstreamError(
            f"finetune: shots={shots} but class {name!r} of {data} has only {smallest} examples"
        )


def extract_features(encoder: nn.Module, images: torch.Tensor, batch: int = FEATURE_BATCH,
                     desc: str = "features") -> torch.Tensor:
    """Frozen eval-mode outputs of ``encoder`` on ``images`` (N, C, H, W in [0, 1]), on the
    CPU; batches go to the encoder's device."""
    import torch
    from tqdm.auto import tqdm

    was = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    out = []
    starts = range(0, len(images), batch)
    with torch.no_grad():
        for i in tqdm(starts, desc=desc, unit="batch", mininterval=1.0, disable=len(starts) < 5):
            out.append(encoder(images[i : i + batch].to(dev, non_blocking=True)).cpu())
    encoder.train(was)
    return torch.cat(out) if out else torch.empty(0)


def fit_probe(
    features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int
) -> dict[str, Any]:
    """A multinomial L2 logistic-regression probe, C chosen on a stratified hold-out.

    Features are centred and divided by one global scale for the fit, so that one C grid
    suits every tower, and that affine map is folded back into the returned
    ``weight``/``bias``: they apply to raw features, so the head they initialise reproduces
    the probe exactly. The scale is global, not per dimension, on purpose: dividing by each
    dimension's spread would blow up the weights of near-constant features, and fine-tuning
    from such a head diverges as soon as those features move.
    """
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        raise UpstreamError("finetune: the training set holds fewer than 2 classes")
    mu = features.mean(0)
    sigma = float(np.sqrt(((features - mu) ** 2).sum(1).mean() / features.shape[1])) + 1e-8
    z = (features - mu) / sigma

    def fit(c: float, x: np.ndarray, y: np.ndarray) -> Any:
        return LogisticRegression(C=c, solver="lbfgs", max_iter=1000).fit(x, y)

    best_c, holdout_acc = 1.0, float("nan")
    if counts.min() >= 2:
        n_test = max(len(present), round(HOLDOUT_FRACTION * len(labels)))
        x_tr, x_te, y_tr, y_te = train_test_split(
            z, labels, test_size=n_test, stratify=labels, random_state=seed
        )
        scored = []
        for c in PROBE_C_GRID:
            clf = fit(c, x_tr, y_tr)
            proba = np.clip(clf.predict_proba(x_te), 1e-12, 1)
            cols = np.searchsorted(clf.classes_, y_te)
            nll = float(-np.log(proba[np.arange(len(y_te)), cols]).mean())
            acc = float((clf.predict(x_te) == y_te).mean())
            scored.append((acc, -nll, c))  # best accuracy; ties go to the lower hold-out loss
        holdout_acc, _, best_c = max(scored)
    clf = fit(best_c, z, labels)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; a softmax head needs two
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, features.shape[1]))
    # A class absent from the training set is never predicted by the probe either.
    bias = np.full(num_classes, float(intercept.min()) - 10.0)
    weight[clf.classes_] = coef / sigma
    bias[clf.classes_] = intercept - (coef / sigma) @ mu
    return {
        "weight": torch.tensor(weight, dtype=torch.float32),
        "bias": torch.tensor(bias, dtype=torch.float32),
        "C": float(best_c),
        "holdout_accuracy": holdout_acc,
        "train_accuracy": float((clf.predict(z) == labels).mean()),
    }


def finetune(config: FinetuneConfig) -> dict[str, Any]:
    """Probe and/or fine-tune; return {model, mlflow_run_id, ...}."""
    import numpy as np
    import torch

    from upstream import allocator, loader, models, storage, tracking, training

    # Input checks, cheapest first, all before any image is decoded or model built.
    if config.mode != "lp" and config.epochs < 1:
        raise UpstreamError(f"finetune: mode {config.mode} needs epochs ≥ 1 (got {config.epochs})")
    output = training.output_location(config, config.output)
    storage.check_reachable(output)
    manifest = loader.read_manifest(config.data)
    if manifest.get("labelled") is False:
        raise UpstreamError(f"finetune: {config.data} has no labels (shard it from labelled data)")
    class_names = [str(c) for c in manifest.get("class_names", [])]
    if len(class_names) < 2:
        raise UpstreamError(f"finetune: {config.data} has {len(class_names)} classes; need ≥ 2")
    check_shots(manifest, config.shots, config.data)
    ckpt = models.load_checkpoint(config.pretrained)
    model_uri = storage.join(output, models.MODEL_FILE)

    stored = stored_kshot(config.data, config.shots, config.seed) if config.shots else None
    if stored is not None:
        # The shard stage stored this split: decode those images only.
        images, labels_t, _ = loader.load_split(config.data, indices=stored)
        labels = np.asarray(labels_t, dtype=np.int64)
    else:
        images, labels_t, _ = loader.load_split(config.data)
        labels = np.asarray(labels_t, dtype=np.int64)
        if config.shots:
            idx = np.asarray(
                loader.kshot_indices(labels, config.shots, config.seed, class_names=class_names),
                dtype=np.int64,
            )
            images, labels = images[torch.as_tensor(idx)], labels[idx]
    images = torch.as_tensor(images, dtype=torch.float32)
    if len(labels) == 0:
        raise UpstreamError(f"finetune: {config.data} holds no samples")

    allocator.keep_freed_memory()  # freed memory stays for the next step
    generator = training.seed_everything(config.seed)
    encoder = models.encoder_from_state(ckpt["model_name"], ckpt["visual"])
    model = models.Classifier(encoder, len(class_names)).to(training.device())
    architecture = models.describe_architecture(ckpt["model_name"], encoder.visual)
    data_fingerprint = training.manifest_fingerprint(manifest)
    pconf = ckpt.get("config", {})
    tags = {
        "upstream.method": ckpt.get("method", ""),
        "upstream.model": ckpt["model_name"],
        "upstream.source": ckpt.get("data_source", ""),
        "upstream.downstream": training.manifest_source(manifest),
        "upstream.mode": config.mode,
        "upstream.shots": config.shots,
    }
    with tracking.stage_run(config, config.experiment, tags=tags) as run:
        import mlflow

        mlflow.log_params({
            "data.fingerprint": data_fingerprint,
            "data.num_train": len(labels),
            "data.num_classes": len(class_names),
            "model.architecture": architecture,
            "pretrained.method": ckpt.get("method", ""),
            "pretrained.data_fingerprint": ckpt.get("data_fingerprint", ""),
            "pretrained.mlflow_run_id": ckpt.get("mlflow_run_id", ""),
            "output.model": model_uri,
        })
        result: dict[str, Any] = {"mode": config.mode, "shots": config.shots,
                                  "num_train": int(len(labels))}
        if config.mode in ("lp", "lp-ft"):
            features = extract_features(encoder, images).numpy().astype(np.float64)
            probe = fit_probe(features, labels, len(class_names), config.seed)
            with torch.no_grad():
                model.head.weight.copy_(probe["weight"].to(model.head.weight.device))
                model.head.bias.copy_(probe["bias"].to(model.head.bias.device))
            probe_metrics = {
                "probe_C": probe["C"],
                "probe_train_accuracy": probe["train_accuracy"],
                "probe_num_train": int(len(labels)),
            }
            if not math.isnan(probe["holdout_accuracy"]):
                probe_metrics["probe_holdout_accuracy"] = probe["holdout_accuracy"]
            mlflow.log_metrics(probe_metrics)
            result.update(probe_metrics)
            log.info("probe: C=%g, train accuracy %.3f", probe["C"], probe["train_accuracy"])
        else:
            with torch.no_grad():  # FT from scratch starts from a zero head (Kumar et al.)
                model.head.weight.zero_()
                model.head.bias.zero_()

        if config.mode in ("ft", "lp-ft"):
            result.update(_train(model, images, labels, config, generator, run.info.run_id,
                                 vit=models.tower_is_vit(ckpt["model_name"])))

        lineage = {
            "pretrain.method": ckpt.get("method", ""),
            "pretrain.model": ckpt["model_name"],
            "pretrain.source": ckpt.get("data_source", ""),
            "pretrain.data_fingerprint": ckpt.get("data_fingerprint", ""),
            "pretrain.seed": pconf.get("seed", ""),
            "pretrain.epochs": pconf.get("epochs", ""),
            "pretrain.mlflow_run_id": ckpt.get("mlflow_run_id", ""),
            "finetune.mode": config.mode,
            "finetune.shots": config.shots,
            "finetune.seed": config.seed,
            "finetune.source": training.manifest_source(manifest),
            "finetune.data_fingerprint": data_fingerprint,
            "finetune.mlflow_run_id": run.info.run_id,
        }
        saved = {
            "format": models.MODEL_FORMAT,
            "format_version": models.FORMAT_VERSION,
            "model_name": ckpt["model_name"],
            "architecture": architecture,
            "image_size": encoder.image_size,
            "embed_dim": int(ckpt.get("embed_dim", model.head.in_features)),
            "visual": models.plain_state_dict(encoder.visual),
            "head_weight": model.head.weight.detach().cpu().clone(),
            "head_bias": model.head.bias.detach().cpu().clone(),
            "class_names": class_names,
            "config": config.model_dump(mode="json") | {"output": output},
            "pretrain_config": pconf,
            "lineage": {k: str(v) for k, v in lineage.items()},
        }
        # model.pt is the stage's completion marker: one object, written last.
        models.save_file(saved, model_uri)
        # Logged from the CPU, so that it loads on machines without a GPU.
        models.log_mlflow_model(model.cpu(), encoder.image_size, len(class_names))
        result.update({"model": model_uri, "mlflow_run_id": run.info.run_id})
        return result


def _train(
    model: Classifier,
    images: torch.Tensor,
    labels: np.ndarray,
    config: FinetuneConfig,
    generator: torch.Generator,
    run_id: str,
    vit: bool,
) -> dict[str, float]:
    """Full fine-tuning: AdamW, linear warmup over the first 10% of steps then cosine decay,
    cross-entropy; BatchNorm statistics frozen.

    BatchNorm stays in eval mode as in Kumar et al.'s LP-FT: with a few shots per class a
    batch's statistics are noise, and they would also shift the features the probe was fitted
    on.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from upstream import training

    dev = next(model.parameters()).device
    y = torch.as_tensor(labels, dtype=torch.long)
    n = len(y)
    steps_per_epoch = math.ceil(n / config.batch_size)
    optimizer = training.make_optimizer(model, config.lr, config.weight_decay, vit=vit)
    total_steps = steps_per_epoch * config.epochs
    # A short warmup lets Adam's moment estimates settle before full-size steps move the
    # tower away from the features the probe was fitted on.
    scheduler = training.warmup_cosine(optimizer, total_steps // 10, total_steps)
    metrics = training.MetricLog(run_id, every=10)
    step_losses: list[float] = []
    loss_sum = correct = 0.0
    for epoch in tqdm(range(config.epochs), desc="finetune", unit="epoch", mininterval=1.0):
        model.train()
        training.freeze_batchnorm(model)
        order = torch.randperm(n, generator=generator)
        loss_sum = correct = 0.0
        for i in range(0, n, config.batch_size):
            idx = order[i : i + config.batch_size]
            target = y[idx].to(dev, non_blocking=True)
            logits = model(images[idx].to(dev, non_blocking=True))
            loss = F.cross_entropy(logits, target)
            training.check_finite(loss, epoch, optimizer.param_groups[0]["lr"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step_losses.append(loss.item())
            loss_sum += step_losses[-1] * len(idx)
            correct += (logits.argmax(1) == target).sum().item()
        metrics.add(epoch, ft_loss=loss_sum / n, ft_train_accuracy=correct / n,
                    ft_lr=optimizer.param_groups[0]["lr"])
    metrics.close()
    model.eval()
    _log_loss_curve(step_losses, config)
    return {"final_loss": loss_sum / n, "train_accuracy": correct / n}


def _log_loss_curve(losses: list[float], config: FinetuneConfig) -> None:
    import tempfile
    from pathlib import Path

    import mlflow

    from upstream import plots

    with tempfile.TemporaryDirectory(prefix="upstream-plot-") as tmp:
        shots = f"{config.shots}-shot" if config.shots else "full-shot"
        png = plots.loss_curve(range(len(losses)), losses, Path(tmp, "loss_curve.png"),
                               title=f"{config.mode} fine-tuning loss ({shots})")
        mlflow.log_artifact(str(png))
