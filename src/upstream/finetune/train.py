"""Full fine-tuning of one grid cell, and scoring a classifier on the validation split.

The loop follows torchvision's reference classification recipe, on in-memory images (a
downstream training set of a few-shot grid is small, and every cell of the grid reuses it):
shuffle with the cell's generator, cross-entropy, the recipe's optimiser with warmup + cosine
stepped per batch, optional gradient clipping. BatchNorm is frozen (eval mode, as Kumar et
al.'s LP-FT) or trained, as the recipe says. A loss that stops being finite ends the cell as
*diverged* instead of failing the grid: the other learning rates are still compared.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

    from upstream.finetune.config import Recipe
    from upstream.models import Classifier


@dataclasses.dataclass
class TrainResult:
    losses: list[float]
    #: Per epoch: ft_loss, ft_train_accuracy, ft_lr.
    history: list[dict[str, float]]
    final_loss: float
    train_accuracy: float
    diverged: bool
    steps: int
    seconds: float


def make_optimizer(model: Classifier, recipe: Recipe, lr: float, vit: bool) -> Any:
    from upstream import training

    if recipe.optimizer == "sgd":
        return training.make_sgd(model, lr, recipe.weight_decay)
    return training.make_optimizer(model, lr, recipe.weight_decay, vit=vit)


def train(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    recipe: Recipe,
    lr: float,
    generator: torch.Generator,
    vit: bool,
) -> TrainResult:
    """Fine-tune ``model`` in place on ``images`` (N, C, H, W in [0, 1]) and ``labels``."""
    import torch
    import torch.nn.functional as F

    from upstream import training

    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    n = len(labels)
    batch = min(recipe.batch_size, n)
    steps_per_epoch = math.ceil(n / batch)
    epochs = recipe.epochs_for(steps_per_epoch)
    total = steps_per_epoch * epochs
    optimizer = make_optimizer(model, recipe, lr, vit)
    scheduler = training.warmup_cosine(optimizer, recipe.warmup_for(total), total)
    losses: list[float] = []
    history: list[dict[str, float]] = []
    loss_sum = correct = 0.0
    diverged = False
    for _ in range(epochs):
        model.train()
        if recipe.batchnorm == "frozen":
            training.freeze_batchnorm(model)
        order = torch.randperm(n, generator=generator)
        loss_sum = correct = 0.0
        for i in range(0, n, batch):
            idx = order[i : i + batch]
            if recipe.batchnorm == "train" and len(idx) < 2 < n:
                continue  # BatchNorm cannot train on a batch of one
            target = labels[idx].to(dev, non_blocking=True)
            logits = model(images[idx].to(dev, non_blocking=True))
            loss = F.cross_entropy(logits, target)
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if recipe.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
            optimizer.step()
            scheduler.step()
            losses.append(value)
            loss_sum += value * len(idx)
            correct += (logits.argmax(1) == target).sum().item()
        if diverged:
            break
        history.append({"ft_loss": loss_sum / n, "ft_train_accuracy": correct / n,
                        "ft_lr": optimizer.param_groups[0]["lr"]})
    model.eval()
    return TrainResult(
        losses=losses,
        history=history,
        final_loss=math.nan if diverged else loss_sum / n,
        train_accuracy=math.nan if diverged else correct / n,
        diverged=diverged,
        steps=len(losses),
        seconds=time.perf_counter() - t0,
    )


def score_logits(logits: torch.Tensor, labels: torch.Tensor | np.ndarray) -> dict[str, float]:
    """Validation top-1, cross-entropy and macro-F1 (over the classes present) of logits."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.metrics import f1_score

    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if not torch.isfinite(logits).all():
        return {"val_top1": math.nan, "val_loss": math.nan, "val_macro_f1": math.nan}
    pred = logits.argmax(1)
    present = sorted(set(y.tolist()))
    return {
        "val_top1": float((pred == y).float().mean()),
        "val_loss": float(F.cross_entropy(logits.float(), y)),
        "val_macro_f1": float(f1_score(y.numpy(), pred.numpy(), labels=present,
                                       average="macro", zero_division=0)),
    }


def predict(model: Classifier, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Logits of ``model`` (eval mode) on ``images``, on the CPU."""
    import torch

    model.eval()
    dev = next(model.parameters()).device
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            out.append(model(images[i : i + batch].to(dev, non_blocking=True)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
