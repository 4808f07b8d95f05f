"""Pre-training stage: ``clip``, ``simclr`` or ``supervised`` on one image tower, on one
process or many (torchrun, DDP), resumable mid-epoch; writes a checkpoint and an MLflow run.

The three methods train the identical image encoder (:func:`upstream.models.build_image_encoder`
or, for clip, the same tower inside the open_clip model); only the head and the loss differ:

- ``clip``: open_clip's ClipLoss with ``local_loss`` and ``gather_with_grad`` across ranks;
- ``simclr``: two augmented views, an MLP projection head, NT-Xent (temperature 0.1) with
  features gathered across ranks;
- ``supervised``: cross-entropy on the labels.

Batches: ``batch_size`` is the global batch of one optimizer step. Each of ``W`` ranks reads
``batch_size / W`` samples a step, in ``accum_steps`` micro-batches. A contrastive loss sees
the negatives of its micro-batch on every rank (open_clip's ``accum_freq`` feature cache, which
would give every micro-batch the whole batch's negatives, is not done here).

Budget: ``train_samples`` samples seen (0: ``epochs`` passes over the data). Resumption:
training state every ``checkpoint_every`` steps (:mod:`upstream.pretrain.trainstate`);
``resume=auto`` continues from the newest. Every step's random numbers are seeded from (seed,
step, rank) and every batch's augmentations from (seed, epoch, rank, worker, batch) (SimCLR's
views, made in this process: from (seed, epoch, batch, rank)), so a resumed run takes the steps
an uninterrupted one would; with ``deterministic`` it ends with the same weights.

One writer per output (:mod:`upstream.claims`): rank 0 (or the process that starts torchrun)
claims the output before anything is written. Another config is refused in one line naming
the holder; the same config waits, then returns the holder's result, or resumes from
``state/`` if the holder failed or died. A finished checkpoint of another config at the
output is refused too (it used to be returned as this config's result).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from upstream import claims
from upstream.config import StageConfig, wiring

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

METHODS = ("clip", "simclr", "supervised")


@functools.cache
def _model_config_names() -> frozenset[str]:
    """Names of open_clip's and upstream's model configs, found without importing open_clip
    (the import takes seconds; parsing a config should not)."""
    folders = [Path(__file__).parent.parent / "model_configs"]
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        folders += [Path(p, "model_configs") for p in spec.submodule_search_locations]
    return frozenset(p.stem for folder in folders for p in folder.glob("*.json"))


class PretrainConfig(StageConfig):
    stage: ClassVar[str] = "pretrain"
    not_decisive: ClassVar[frozenset[str]] = frozenset(
        {"output", "experiment", "num_workers", "checkpoint_every", "resume", "procs_per_node",
         "nodes", "registered_model"}
    )

    data: str = wiring(description="Pre-training shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the checkpoint goes (folder or s3:// prefix).")
    method: Literal["clip", "simclr", "supervised"] = Field(
        "clip", description="Pre-training method."
    )
    model: str = Field(
        "upstream-tiny-rn",
        description="Image tower for every method: an open_clip model name (RN50, ViT-B-32, "
        "...), tv-resnet50 (torchvision's ResNet-50 trunk) or one of upstream's tiny configs.",
    )
    source_name: str = Field(
        "", description="What the pre-training data is called in lineage, tags and reports "
        "(a study's source name); empty: the shards' source (fractals, digits, ...)."
    )
    epochs: int = Field(3, ge=1, description="Passes over the data (when train_samples is 0).")
    train_samples: int = Field(
        0, ge=0, description="Training budget in samples seen (0: epochs passes)."
    )
    batch_size: int = Field(64, ge=2, description="Global batch per optimizer step.")
    accum_steps: int = Field(1, ge=1, description="Micro-batches per step (gradient accumulation).")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (not on norms, biases).")
    warmup_steps: int = Field(10, ge=0, description="Linear warmup steps before the cosine decay.")
    grad_clip: float = Field(0.0, ge=0, description="Clip the gradient norm to this (0: off).")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 autocast on a GPU, fp32 on the CPU; fp16 uses a "
        "GradScaler and needs a GPU.",
    )
    channels_last: bool = Field(False, description="channels_last memory format (GPU).")
    compile: bool = Field(False, description="torch.compile the model.")
    augment: Literal["none", "crop"] = Field(
        "none", description="clip/supervised: none (images as stored) or a random resized "
        "crop; simclr always uses its two-view recipe.",
    )
    temperature: float = Field(0.1, gt=0, description="simclr: NT-Xent temperature.")
    projection_hidden: int = Field(
        0, ge=0, description="simclr: projection MLP width (0: the tower's feature width, as "
        "SimCLR sizes it; SLIP's ViT-B head is 4096).",
    )
    projection_dim: int = Field(
        128, ge=1, description="simclr: projection output size (SimCLR's 128; SLIP's 256)."
    )
    seed: int = Field(0, description="Seed for initialisation, data order and augmentation.")
    shuffle: bool = Field(
        True, description="Shuffle the data every epoch (off: the shards' own order)."
    )
    deterministic: bool = Field(False, description="Deterministic kernels (bitwise resumes).")
    num_workers: int = Field(
        0, ge=0, description="Data-loading worker processes (0: decode in the training process)."
    )
    checkpoint_every: int = Field(
        0, ge=0, description="Save resumable training state every N steps (0: at the end only)."
    )
    resume: str = Field(
        "auto", description="auto: continue from the output's latest training state if any; "
        "never: start over; or the URI of a state file.",
    )
    procs_per_node: int = Field(
        1, ge=1, description="Training processes per node (one per GPU; gloo processes on CPU)."
    )
    nodes: int = Field(1, ge=1, description="Nodes (> 1: a Kubeflow PyTorchJob).")
    registered_model: str = Field(
        "", description="Model registry name (default: <experiment>-<source>-<method>)."
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

    @model_validator(mode="after")
    def _batch_splits(self) -> PretrainConfig:
        world = self.procs_per_node * self.nodes
        if self.batch_size % (world * self.accum_steps):
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by {world} process(es) × "
                f"{self.accum_steps} accumulation step(s)"
            )
        if self.batch_size // (world * self.accum_steps) < 2:
            raise ValueError(
                f"batch_size {self.batch_size} leaves fewer than 2 samples per micro-batch "
                f"over {world} process(es) × {self.accum_steps} accumulation step(s)"
            )
        return self


def registry_name(config: PretrainConfig, source: str) -> str:
    """The model registry name: the config's, else ``<experiment>-<source>-<method>``."""
    name = config.registered_model or f"{config.experiment}-{source}-{config.method}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "upstream"


def _interventions(manifest: dict[str, Any]) -> str:
    steps = manifest.get("interventions", {}).get("steps", [])
    return ",".join(str(s.get("step")) for s in steps) or "none"


def _precision(config: PretrainConfig, cuda: bool) -> str:
    from upstream.errors import UpstreamError

    if config.precision == "auto":
        return "bf16" if cuda else "fp32"
    if config.precision == "fp16" and not cuda:
        raise UpstreamError("pretrain: precision fp16 needs a GPU (use fp32 or bf16 on a CPU)")
    return config.precision


def _one_size(manifest: dict[str, Any]) -> bool:
    """Whether every image of the shard set has the same size (square-resized shards)."""
    return manifest.get("resize") == "square"


def _transform(config: PretrainConfig, image_size: int, manifest: dict[str, Any]) -> Any:
    from upstream.pretrain import augment

    if config.method == "simclr":
        # Images of one size come as they are stored and get their views in the training
        # loop, a batch at a time (_batch_views); others get them here, image by image.
        return None if _one_size(manifest) else augment.simclr_views(image_size)
    if config.augment == "crop":
        return (augment.clip_train if config.method == "clip" else augment.supervised_train)(
            image_size
        )
    return None  # the images as stored; the encoder resizes them


def _batch_views(config: PretrainConfig, image_size: int, manifest: dict[str, Any]) -> Any:
    """SimCLR's views made on the batch tensor, or None (another method, or images of several
    sizes: the loader's per-image transform makes them, see :func:`_transform`).

    In the training process, on the batch as the loader delivers it (moved to the device
    first), rather than in the loader's workers: on 2 CPU cores either place gave the same
    throughput (README, "Benchmarks"), and here the views run on the GPU where there is one,
    instead of taking a worker's CPU each batch, while the worker sends each batch as stored,
    not as two views of it.
    """
    from upstream.pretrain import augment

    if config.method != "simclr" or not _one_size(manifest):
        return None
    return augment.simclr_batch_views(image_size)


class Objective:
    """The method's loss as one module call, so that DDP sees every parameter's forward."""

    @staticmethod
    def build(config: PretrainConfig, net: Any, world: Any, tokenizer: Any) -> Any:
        import torch.nn.functional as F
        from torch import nn

        from upstream.pretrain import objectives

        method = config.method

        class _Loss(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = net
                self.clip_loss = (
                    objectives.clip_loss(world.size, world.rank) if method == "clip" else None
                )
                self.ntxent = (
                    objectives.NTXentLoss(config.temperature) if method == "simclr" else None
                )

            def forward(
                self, images: torch.Tensor, labels: torch.Tensor, tokens: torch.Tensor | None
            ) -> torch.Tensor:
                if method == "supervised":
                    return F.cross_entropy(self.net.head(self.net.encoder(images)), labels)
                if method == "simclr":
                    b = images.shape[0]
                    both = images.flatten(0, 1)  # (B, 2, C, H, W) → (2B, C, H, W), views paired
                    z = self.net.projection(self.net.encoder(both)).view(b, 2, -1)
                    return self.ntxent(z[:, 0], z[:, 1])
                clip = self.net.clip
                image = F.normalize(self.net.encoder(images), dim=-1)
                text = clip.encode_text(tokens, normalize=True)
                return self.clip_loss(image, text, clip.logit_scale.exp())

        return _Loss()


def _completed(checkpoint_uri: str, config: PretrainConfig) -> dict[str, Any] | None:
    """The result of a run of ``config`` whose final checkpoint exists (a re-run step is a
    no-op); another config's checkpoint there is an error, not this config's result."""
    from upstream import models, storage
    from upstream.errors import UpstreamError

    if not storage.exists(checkpoint_uri):
        return None
    ckpt = models.load_checkpoint(checkpoint_uri)
    theirs = ckpt.get("config_fingerprint")  # absent in checkpoints written before it was
    if theirs is not None and theirs != config.fingerprint():
        raise UpstreamError(
            f"pretrain: {checkpoint_uri} is the checkpoint of another config (fingerprint "
            f"{theirs}, method {ckpt.get('method')}, not {config.fingerprint()}); use another "
            "output or remove it"
        )
    return {
        "checkpoint": checkpoint_uri,
        "mlflow_run_id": ckpt.get("mlflow_run_id", ""),
        "final_loss": ckpt.get("final_loss", float("nan")),
        "samples_per_s": ckpt.get("samples_per_s", float("nan")),
        "steps": ckpt.get("steps", 0),
        "resumed": "complete",
    }


def pretrain(config: PretrainConfig) -> dict[str, Any]:
    """Train (this process's share, under torchrun), write the checkpoint and log to MLflow
    (rank 0); return {checkpoint, mlflow_run_id, final_loss, samples_per_s, steps}."""

    from upstream import models, storage, tracking, training
    from upstream.errors import UpstreamError
    from upstream.pretrain import distributed, trainstate
    from upstream.shards import loader

    # Everything that can be wrong with the input is checked before the model is built.
    models.validate_model_name(config.model)
    under_torchrun = "WORLD_SIZE" in os.environ
    if not under_torchrun and config.nodes > 1:
        raise UpstreamError(
            f"pretrain: nodes={config.nodes} runs as a Kubeflow PyTorchJob (the pipeline's "
            "pretrain step creates it); on one machine use procs_per_node"
        )
    if not under_torchrun and config.procs_per_node > 1:
        return _torchrun(config)
    world = distributed.init()
    expected_world = config.procs_per_node * config.nodes
    if world.size != expected_world and world.size > 1:
        raise UpstreamError(
            f"pretrain: started as {world.size} processes, but the config says "
            f"{config.procs_per_node} per node × {config.nodes} node(s)"
        )
    precision = _precision(config, world.device.type == "cuda")
    output = training.output_location(config, config.output)
    storage.check_reachable(output)
    tracking.check_reachable()
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
    if config.resume == "auto":
        done = _completed(checkpoint_uri, config)
        if done is not None:
            _log_unlogged(config, checkpoint_uri, done["mlflow_run_id"])
            log.info("pretrain: %s is complete already; nothing to do", checkpoint_uri)
            return done
    data_fingerprint = training.manifest_fingerprint(manifest)
    run_facts = {
        "model": config.model,
        "method": config.method,
        "batch_size": config.batch_size,
        "data_fingerprint": data_fingerprint,
        "sample_order": loader.SAMPLE_ORDER,
    }
    found = trainstate.find(output, config.resume)
    if found is not None:
        trainstate.check_compatible(found, run_facts)
    # Only rank 0 writes (states, checkpoint, model): it alone claims the output. Under
    # _torchrun it finds its parent's claim instead.
    claim = (claims.claimed(output, config.fingerprint(), "pretrain") if world.is_main
             else contextlib.nullcontext(None))
    with claim as held:
        if held is not None and held.waited:
            # A writer of this config held the output: it may have finished, or saved states.
            if world.size > 1:
                # Returning alone would leave the other ranks waiting for rank 0 forever.
                raise UpstreamError(f"pretrain: {output} was written by another run of this "
                                    "config while this one waited; run it again to resume")
            done = _completed(checkpoint_uri, config) if config.resume == "auto" else None
            if done is not None:
                log.info("pretrain: %s was completed by the writer this one waited for",
                         checkpoint_uri)
                return done
            found = trainstate.find(output, config.resume)
            if found is not None:
                trainstate.check_compatible(found, run_facts)
        return _train(config, world, precision, output, manifest, checkpoint_uri, run_facts,
                      found, held)


def _train(
    config: PretrainConfig,
    world: Any,
    precision: str,
    output: str,
    manifest: dict[str, Any],
    checkpoint_uri: str,
    run_facts: dict[str, Any],
    found: Any,
    held: Any,
) -> dict[str, Any]:
    """:func:`pretrain`'s training, after its checks, under the claim ``held`` (None on the
    ranks that write nothing)."""
    import torch

    from upstream import allocator, models, tracking, training
    from upstream.errors import UpstreamError
    from upstream.pretrain import augment, distributed, trainstate
    from upstream.shards import loader

    num_samples = int(manifest.get("num_samples", 0))
    class_names = [str(c) for c in manifest.get("class_names", [])]
    data_fingerprint = run_facts["data_fingerprint"]
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    # Before the model and the loader's workers exist: freed memory stays for the next step.
    allocator.keep_freed_memory()
    training.seed_everything(config.seed)
    net = models.build_pretrain_model(
        config.model, config.method, len(class_names),
        projection_hidden=config.projection_hidden, projection_out=config.projection_dim,
    )
    image_size = net.encoder.image_size
    tokenizer = models.tokenizer(config.model) if config.method == "clip" else None
    per_rank = config.batch_size // world.size
    micro = per_rank // config.accum_steps
    stream = loader.Stream(
        config.data,
        batch_size=micro,
        shuffle_seed=config.seed if config.shuffle else None,
        epoch=0,
        transform=_transform(config, image_size, manifest),
        with_captions=config.method == "clip",
        # Captions become tokens in the data workers, off the training process.
        tokenizer=tokenizer,
        num_workers=config.num_workers,
        # Every step sees full batches: a short one gives a contrastive loss fewer negatives
        # (a lower, incomparable loss) and the schedule a step of another size.
        drop_last=True,
        rank=world.rank,
        world_size=world.size,
    )
    views = _batch_views(config, image_size, manifest)
    micro_per_epoch = len(stream)
    if micro_per_epoch < config.accum_steps:
        raise UpstreamError(
            f"pretrain: {config.data} gives {micro_per_epoch} micro-batch(es) of {micro} per "
            f"process, fewer than one step of {config.accum_steps}"
        )
    if config.train_samples:
        total_steps = max(1, config.train_samples // config.batch_size)
    else:
        total_steps = config.epochs * micro_per_epoch // config.accum_steps

    net = net.to(world.device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = training.make_optimizer(
        net, config.lr, config.weight_decay, vit=models.tower_is_vit(config.model)
    )
    scheduler = training.warmup_cosine(optimizer, config.warmup_steps, total_steps)
    scaler = torch.amp.GradScaler(world.device.type, enabled=precision == "fp16")
    loss_module: torch.nn.Module = Objective.build(config, net, world, tokenizer)
    if world.size > 1:
        loss_module = torch.nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[world.local_rank] if world.device.type == "cuda" else None
        )
    step_fn = torch.compile(loss_module) if config.compile else loss_module
    architecture = models.describe_architecture(config.model, net.encoder.visual)

    step, epoch, position = 0, 0, 0
    history: dict[str, list[float]] = {"step": [], "loss": []}
    run_id: str | None = None
    if found is not None:
        state = found.state
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        trainstate.set_rng_states(state["rng"])
        step, epoch, position = int(state["step"]), int(state["epoch"]), int(state["position"])
        history = {k: list(v) for k, v in state["history"].items()}
        run_id = state.get("mlflow_run_id") or None
        log.info("pretrain: resuming from %s at step %d (epoch %d, batch %d)",
                 found.uri, step, epoch, position)
    log.info("pretrain %s %s on %s (%d samples, %d steps, %d process(es), %s, %s)",
             config.method, architecture, config.data, num_samples, total_steps, world.size,
             world.device, precision)

    autocast = (
        functools.partial(torch.autocast, world.device.type,
                          dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
        if precision in ("bf16", "fp16") else contextlib.nullcontext
    )
    tags = {
        "upstream.method": config.method,
        "upstream.model": config.model,
        "upstream.source": (config.source_name or training.manifest_source(manifest)),
        "upstream.size": str(num_samples),
        "upstream.intervention": _interventions(manifest),
        "upstream.architecture": architecture,
    }
    tracked = (
        tracking.stage_run(config, config.experiment, tags, run_id=run_id, system_metrics=True)
        if world.is_main else contextlib.nullcontext(None)
    )
    with tracked as run:
        if run is not None and run_id is None:
            import mlflow

            mlflow.log_params({
                "data.fingerprint": data_fingerprint,
                "data.num_samples": num_samples,
                "data.num_classes": len(class_names),
                "model.architecture": architecture,
                "train.total_steps": total_steps,
                "train.world_size": world.size,
                "train.precision": precision,
                "output.checkpoint": checkpoint_uri,
            })
        run_id = run.info.run_id if run is not None else None
        metrics = training.MetricLog(run_id) if run_id else None

        def save_state() -> None:
            if not world.is_main:
                return
            held.check()
            trainstate.save(output, step, {
                "run": run_facts,
                "step": step, "epoch": epoch, "position": position,
                "model": models.plain_state_dict(net),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": trainstate.rng_states(),
                "history": history,
                "mlflow_run_id": run_id or "",
            })

        timings: list[tuple[int, float, float]] = []  # (samples, seconds, data wait) per step
        net.train()
        bar = _progress(world.is_main, total_steps, step, config.method)
        batches: Any = None
        micro_done = 0
        # A step's time runs from the end of the previous one: the logging between steps
        # counts (in the next step's time), checkpoint saves do not.
        t_mark = time.perf_counter()
        while step < total_steps:
            t_step = t_mark
            waited = 0.0
            # Per-step seeds: the random numbers of step k do not depend on how the run got
            # there (resumed or not), on any rank.
            step_seed = hash((config.seed, step, world.rank)) % 2**63
            # Not torch.manual_seed: it also queues seeds for every other device type,
            # capturing a stack trace each time (~1.5 ms a call, every step).
            torch.default_generator.manual_seed(step_seed)
            if world.device.type == "cuda":
                torch.cuda.manual_seed(step_seed)
            optimizer.zero_grad(set_to_none=True)
            losses = []
            for k in range(config.accum_steps):
                t_wait = time.perf_counter()
                if batches is None:
                    if position >= stream.settings.plan(epoch).num_batches:
                        epoch, position = epoch + 1, 0  # saved right at the end of an epoch
                    # Epoch after epoch: the readers run on across epoch boundaries.
                    batches = stream.epochs(epoch, start=position)
                epoch, position, batch = next(batches)
                images, labels, tokens = batch
                images = images.to(world.device, non_blocking=True)
                if config.channels_last and images.dim() == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                labels = labels.to(world.device, non_blocking=True)
                tokens = (tokens.to(world.device, non_blocking=True)
                          if tokenizer is not None else None)
                waited += time.perf_counter() - t_wait
                if views is not None:  # SimCLR's two views, per image, seeded by the batch
                    images = views(images, seed=augment.view_seed(
                        config.seed, epoch, position, world.rank))
                position += 1
                micro_done += 1
                sync = (k == config.accum_steps - 1 or world.size == 1)
                context = (loss_module.no_sync() if not sync and world.size > 1
                           else contextlib.nullcontext())
                with context, autocast():
                    loss = step_fn(images, labels, tokens) / config.accum_steps
                scaler.scale(loss).backward()
                losses.append(loss.detach())
            lr = optimizer.param_groups[0]["lr"]
            total = torch.stack(losses).sum()
            if world.size > 1:  # the logged loss is the whole batch's: the ranks' mean
                torch.distributed.all_reduce(total)
                total /= world.size
            value = float(total)
            training.check_finite(torch.tensor(value), step, lr)
            if config.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if net.clip is not None:
                with torch.no_grad():  # CLIP's cap on the temperature: logit scale ≤ 100
                    net.clip.logit_scale.clamp_(0, math.log(100))
            scheduler.step()
            step += 1
            t_mark = time.perf_counter()
            elapsed = t_mark - t_step
            timings.append((config.batch_size, elapsed, waited))
            history["step"].append(step - 1)
            history["loss"].append(value)
            if metrics is not None:
                metrics.add(step - 1, loss=value, lr=lr,
                            samples_per_s=config.batch_size / elapsed,
                            data_wait_share=waited / elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", refresh=False)
            if config.checkpoint_every and step % config.checkpoint_every == 0 and (
                step < total_steps
            ):
                save_state()
                t_mark = time.perf_counter()
        bar.close()
        if batches is not None:
            batches.close()  # drops the DataLoader iterator it holds, so the workers can stop
        stream.close()
        steady = timings[1:] or timings  # the first step pays one-off costs
        throughput = sum(n for n, _, _ in steady) / max(1e-9, sum(t for _, t, _ in steady))
        wait_share = sum(w for _, _, w in steady) / max(1e-9, sum(t for _, t, _ in steady))
        tail = history["loss"][-10:]
        final_loss = sum(tail) / len(tail)
        result = {
            "checkpoint": checkpoint_uri,
            "mlflow_run_id": run_id or "",
            "final_loss": final_loss,
            "samples_per_s": throughput,
            "data_wait_share": wait_share,
            "steps": step,
            "resumed": found.uri if found is not None else "",
        }
        if world.is_main:
            held.check()
            _finish(config, net, manifest, class_names, architecture, data_fingerprint,
                    output, checkpoint_uri, result, history, run is not None)
        if metrics is not None:  # after the checkpoint: an MLflow failure must not cost it
            metrics.close()
        distributed.barrier()
    return result


def _torchrun(config: PretrainConfig) -> dict[str, Any]:
    """Run this config as ``procs_per_node`` processes on this machine (torchrun standalone:
    nccl on GPUs, gloo on a CPU); the result is read back from the final checkpoint."""
    from upstream import models, storage, training
    from upstream.errors import UpstreamError

    output = training.output_location(config, config.output)
    storage.check_reachable(output)
    placed = config.model_copy(update={"output": output})
    checkpoint_uri = storage.join(output, models.CHECKPOINT_FILE)
    # Claimed here, for the processes torchrun starts: their rank 0 checks this claim.
    with (claims.claimed(output, config.fingerprint(), "pretrain") as held,
          tempfile.TemporaryDirectory(prefix="upstream-torchrun-") as tmp):
        if held.waited and config.resume == "auto":
            done = _completed(checkpoint_uri, config)
            if done is not None:
                return done
        path = Path(tmp, "config.json")
        path.write_text(placed.model_dump_json())
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc-per-node={config.procs_per_node}", "-m", "upstream.pretrain",
                   str(path)]
        log.info("pretrain: %s", " ".join(command))
        code = subprocess.run(command, check=False, env={**os.environ, **held.env()}).returncode
    if code != 0:
        raise UpstreamError(f"pretrain: torchrun with {config.procs_per_node} processes "
                            f"failed (exit code {code}); see the log above")
    done = _completed(checkpoint_uri, config)
    if done is None:
        raise UpstreamError(f"pretrain: torchrun ended without a checkpoint at {output}")
    return done


def _progress(show: bool, total: int, initial: int, method: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"pretrain {method}", unit="step",
                mininterval=1.0, disable=not show)


def _finish(
    config: PretrainConfig,
    net: Any,
    manifest: dict[str, Any],
    class_names: list[str],
    architecture: str,
    data_fingerprint: str,
    output: str,
    checkpoint_uri: str,
    result: dict[str, Any],
    history: dict[str, list[float]],
    tracked: bool,
) -> None:
    """Rank 0: the final checkpoint (the stage's completion marker, written last of the
    files), the loss curve, the MLflow model and its registry version."""
    from upstream import models, plots, training

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
        "config_fingerprint": config.fingerprint(),
        "data_fingerprint": data_fingerprint,
        "data_source": (config.source_name or training.manifest_source(manifest)),
        "data_interventions": _interventions(manifest),
        "steps": result["steps"],
        "final_loss": result["final_loss"],
        "samples_per_s": result["samples_per_s"],
        "mlflow_run_id": result["mlflow_run_id"],
    }
    if net.clip is not None:
        checkpoint["clip"] = models.plain_state_dict(net.clip)
    if net.head is not None:
        checkpoint["head_weight"] = net.head.weight.detach().cpu().clone()
        checkpoint["head_bias"] = net.head.bias.detach().cpu().clone()
    # Before anything goes to MLflow: a tracking server failing from here on costs the
    # run's record, never the checkpoint (the next run of the config logs what is missing).
    models.save_file(checkpoint, checkpoint_uri)
    if not tracked:
        return
    import mlflow

    mlflow.log_metrics({"final_loss": result["final_loss"],
                        "samples_per_s_mean": result["samples_per_s"],
                        "data_wait_share_mean": result["data_wait_share"]})
    with tempfile.TemporaryDirectory(prefix="upstream-plot-") as tmp:
        png = plots.loss_curve(history["step"], history["loss"], Path(tmp, "loss_curve.png"),
                               title=f"{config.method} pre-training loss ({config.model})")
        mlflow.log_artifact(str(png))
    # Logged from the CPU, so that it loads on machines without a GPU.
    name = registry_name(config, (config.source_name or training.manifest_source(manifest)))
    models.log_mlflow_model(net.encoder.cpu(), net.encoder.image_size,
                            models.embed_dim_of(config.model), registered_name=name)
    log.info("pretrain done: loss %.4f, %.0f samples/s, checkpoint %s, registered as %s",
             result["final_loss"], result["samples_per_s"], checkpoint_uri, name)



def _log_unlogged(config: PretrainConfig, checkpoint_uri: str, run_id: str) -> None:
    """A finished checkpoint whose MLflow run did not finish (MLflow failed after the
    checkpoint was written, or its process was killed while logging): reopen that run, log
    the final metrics and the model (and its registry version), and end it FINISHED. A run
    still held by a live process, or one this server does not know, is left alone."""
    if not run_id:
        return
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from upstream import models, tracking

    try:
        run = MlflowClient(tracking.tracking_uri()).get_run(run_id)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            return
        raise
    if run.info.status == "FINISHED" or (
        run.info.status == "RUNNING"
        and not tracking.owner_gone(run.data.tags.get(tracking.OWNER_TAG))
    ):
        return
    import mlflow

    log.info("pretrain: MLflow run %s ended %s before the model was logged; logging it now",
             run_id, run.info.status)
    ckpt = models.load_checkpoint(checkpoint_uri)
    encoder = models.encoder_from_state(str(ckpt["model_name"]), ckpt["visual"])
    with tracking.stage_run(config, config.experiment, run_id=run_id):
        mlflow.log_metrics({"final_loss": float(ckpt["final_loss"]),
                            "samples_per_s_mean": float(ckpt["samples_per_s"])})
        models.log_mlflow_model(encoder.cpu(), encoder.image_size,
                                models.embed_dim_of(str(ckpt["model_name"])),
                                registered_name=registry_name(config, str(ckpt["data_source"])))
