"""Pre-training stage: ``supervised`` (cross-entropy) or ``clip`` (open_clip's ClipLoss) on an
open_clip image tower, streaming shards through upstream's loader; writes a checkpoint and an MLflow
run (params, loss and throughput per step, the model)."""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator

from upstream.config import StageConfig, wiring

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@functools.cache
def _model_config_names() -> frozenset[str]:
    """Names of open_clip's and upstream's model configs, found without importing open_clip
    (the import takes seconds; parsing a config should not)."""
    folders = [Path(__file__).parent / "model_configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p, "model_configs") for p in spec.submodule_search_locations]
    return frozenset(p.stem for folder in folders for p in folder.glob("*.json"))


class PretrainConfig(StageConfig):
    stage: ClassVar[str] = "pretrain"

    data: str = wiring(description="Pre-training shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the checkpoint goes (folder or s3:// prefix).")
    method: Literal["supervised", "clip"] = Field("clip", description="Pre-training method.")
    model: str = Field(
        "upstream-tiny-rn",
        description="open_clip model name (RN50, ViT-B-32, ...) or one of upstream's tiny configs.",
    )
    epochs: int = Field(3, ge=1, description="Passes over the pre-training shards.")
    batch_size: int = Field(64, ge=2, description="Samples per step.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms, biases).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    seed: int = Field(0, description="Seed for initialisation and data order.")
    num_workers: int = Field(
        0, ge=0, description="Data-loading worker processes (0: decode in the training process)."
    )
    experiment: str = Field("upstream", description="MLflow experiment name.")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        if v not in _model_config_names():
            tiny = sorted(n for n in _model_config_names() if n.startswith("upstream-"))
            raise ValueError(
                f"unknown model {v!r}; known: {', '.join(tiny)}, RN50, RN101, ViT-B-32, ... "
                "(see open_clip.list_models())"
            )
        return v


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train, write the checkpoint, log to MLflow; return {checkpoint, mlflow_run_id, ...}."""
    # Heavy imports here, not at module level: the CLI and the pipeline compiler import this
    # module for its config alone.
    import open_clip
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from upstream import loader, models, plots, storage, tracking, training
    from upstream.errors import UpstreamError

    # Everything that can be wrong with the input is checked before the model is built.
    models.validate_model_name(config.model)
    output = training.output_location(config, config.output)
    storage.check_reachable(output)
    manifest = loader.read_manifest(config.data)
    num_samples = int(manifest.get("num_samples", 0))
    class_names = [str(c) for c in manifest.get("class_names", [])]
    if num_samples < 2:
        raise UpstreamError(f"pretrain: {config.data} holds {num_samples} samples; need ≥ 2")
    if config.method == "supervised" and manifest.get("labelled") is False:
        raise UpstreamError(f"pretrain: supervised needs labels; {config.data} has none")
    if config.method == "supervised" and len(class_names) < 2:
        raise UpstreamError(
            f"pretrain: supervised needs ≥ 2 classes; {config.data} has {len(class_names)}"
        )
    if config.batch_size > num_samples:
        raise UpstreamError(
            f"pretrain: batch_size {config.batch_size} is larger than {config.data} "
            f"({num_samples} samples)"
        )
    checkpoint_uri = storage.join(output, models.CHECKPOINT_FILE)

    # One stream for the whole run: its data workers and batch buffers live across epochs.
    stream = loader.Stream(
        config.data,
        batch_size=config.batch_size,
        shuffle_seed=config.seed,
        epoch=0,
        transform=None,
        with_captions=config.method == "clip",
        num_workers=config.num_workers,
        # Every step sees a full batch: a short last batch gives CLIP fewer negatives
        # (a lower, incomparable loss) and the schedule a step of a different size.
        drop_last=True,
    )
    total_steps = len(stream) * config.epochs
    data_fingerprint = training.manifest_fingerprint(manifest)

    training.seed_everything(config.seed)
    dev = training.device()
    net = models.build_pretrain_model(config.model, config.method, len(class_names)).to(dev)
    tokenizer = models.tokenizer(config.model) if config.method == "clip" else None
    clip_loss = open_clip.ClipLoss() if config.method == "clip" else None
    optimizer = training.make_optimizer(
        net, config.lr, config.weight_decay, vit=models.tower_is_vit(config.model)
    )
    scheduler = training.warmup_cosine(optimizer, config.warmup_steps, total_steps)
    architecture = models.describe_architecture(config.model, net.encoder.visual)
    log.info("pretrain %s %s on %s (%d samples, %d steps, %s)", config.method, architecture,
             config.data, num_samples, total_steps, dev)

    def step_loss(images: torch.Tensor, labels: torch.Tensor, captions: list[str]) -> torch.Tensor:
        features = net.encoder(images)
        if config.method == "supervised":
            assert net.head is not None
            return F.cross_entropy(net.head(features), labels)
        assert net.clip is not None and tokenizer is not None and clip_loss is not None
        tokens = tokenizer(list(captions)).to(dev, non_blocking=True)
        text = net.clip.encode_text(tokens, normalize=True)
        return clip_loss(F.normalize(features, dim=-1), text, net.clip.logit_scale.exp())

    tags = {
        "upstream.method": config.method,
        "upstream.model": config.model,
        "upstream.source": training.manifest_source(manifest),
    }
    with tracking.stage_run(config, config.experiment, tags=tags) as run:
        import mlflow

        mlflow.log_params({
            "data.fingerprint": data_fingerprint,
            "data.num_samples": num_samples,
            "data.num_classes": len(class_names),
            "model.architecture": architecture,
            "train.total_steps": total_steps,
            "output.checkpoint": checkpoint_uri,
        })
        metrics = training.MetricLog(run.info.run_id)
        steps: list[int] = []
        losses: list[float] = []
        timings: list[tuple[int, float]] = []  # (samples, seconds) per step
        step = 0
        net.train()
        bar = tqdm(total=total_steps, desc=f"pretrain {config.method}", unit="step",
                   mininterval=1.0)
        for epoch in range(config.epochs):
            stream.set_epoch(epoch)
            batches = stream
            t_batch = time.perf_counter()
            for images, labels, captions in batches:
                images = torch.as_tensor(images, dtype=torch.float32).to(dev, non_blocking=True)
                labels = torch.as_tensor(labels, dtype=torch.long).to(dev, non_blocking=True)
                if len(images) < 2:  # a lone sample has no negatives for a contrastive loss
                    continue
                lr = optimizer.param_groups[0]["lr"]
                loss = step_loss(images, labels, captions)
                training.check_finite(loss, step, lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if net.clip is not None:
                    with torch.no_grad():  # CLIP's cap on the temperature: logit scale ≤ 100
                        net.clip.logit_scale.clamp_(0, math.log(100))
                if step < total_steps - 1:
                    scheduler.step()
                now = time.perf_counter()
                elapsed = now - t_batch
                t_batch = now
                timings.append((len(images), elapsed))
                value = loss.item()
                steps.append(step)
                losses.append(value)
                metrics.add(step, loss=value, lr=lr, samples_per_s=len(images) / elapsed)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}", refresh=False)
                step += 1
        bar.close()
        stream.close()
        metrics.flush()
        if step == 0:
            raise UpstreamError(f"pretrain: no batches came from {config.data}")
        # The first step pays one-off costs (allocations, kernel choice): left out when
        # there are others.
        steady = timings[1:] or timings
        throughput = sum(n for n, _ in steady) / max(1e-9, sum(t for _, t in steady))
        final_loss = sum(losses[-10:]) / len(losses[-10:])
        mlflow.log_metrics({"final_loss": final_loss, "samples_per_s_mean": throughput})

        checkpoint: dict[str, Any] = {
            "format": models.CHECKPOINT_FORMAT,
            "format_version": models.FORMAT_VERSION,
            "model_name": config.model,
            "method": config.method,
            "architecture": architecture,
            "image_size": net.encoder.image_size,
            "embed_dim": models.embed_dim_of(config.model),
            "visual": models.plain_state_dict(net.encoder.visual),
            "class_names": class_names,
            "config": config.model_dump(mode="json") | {"output": output},
            "data_fingerprint": data_fingerprint,
            "data_source": training.manifest_source(manifest),
            "steps": step,
            "final_loss": final_loss,
            "mlflow_run_id": run.info.run_id,
        }
        if net.clip is not None:
            checkpoint["clip"] = models.plain_state_dict(net.clip)
        if net.head is not None:
            checkpoint["head_weight"] = net.head.weight.detach().cpu().clone()
            checkpoint["head_bias"] = net.head.bias.detach().cpu().clone()
        # The checkpoint is the stage's completion marker: one object, written last.
        models.save_file(checkpoint, checkpoint_uri)

        with tempfile.TemporaryDirectory(prefix="upstream-plot-") as tmp:
            png = plots.loss_curve(steps, losses, Path(tmp, "loss_curve.png"),
                                   title=f"{config.method} pre-training loss ({config.model})")
            mlflow.log_artifact(str(png))
        # Logged from the CPU, so that it loads on machines without a GPU.
        models.log_mlflow_model(net.encoder.cpu(), net.encoder.image_size,
                                models.embed_dim_of(config.model))
        log.info("pretrain done: loss %.4f, %.0f samples/s, checkpoint %s",
                 final_loss, throughput, checkpoint_uri)
        return {
            "checkpoint": checkpoint_uri,
            "mlflow_run_id": run.info.run_id,
            "final_loss": final_loss,
            "samples_per_s": throughput,
            "steps": step,
        }
