"""The figures a fine-tuning grid logs to its parent MLflow run: validation top-1 against
the learning rate and against k, and the loss curves of the chosen cells."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from upstream import plots
from upstream.finetune.config import TRAINED

plt = plots.plt


def _mean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _k_order(shots: list[int]) -> list[int]:
    """k ascending, with 0 (all) last."""
    return sorted(shots, key=lambda k: (k == 0, k))


def val_vs_lr(table: list[dict[str, Any]], path: Path) -> Path | None:
    modes = [m for m in dict.fromkeys(r["mode"] for r in table) if m in TRAINED]
    if not modes or len({r["lr"] for r in table if r["mode"] in modes}) < 2:
        return None
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), dpi=100,
                             squeeze=False, sharey=True)
    try:
        for ax, mode in zip(axes[0], modes, strict=True):
            rows = [r for r in table if r["mode"] == mode]
            for i, k in enumerate(_k_order(sorted({r["shots"] for r in rows}))):
                lrs = sorted({r["lr"] for r in rows if r["shots"] == k})
                ys = [_mean([r["val_top1"] for r in rows if r["shots"] == k and r["lr"] == lr])
                      for lr in lrs]
                ax.plot(lrs, ys, marker=plots.MARKERS[i % len(plots.MARKERS)],
                        color=plots.color(i), label=f"k = {plots.shots_label(k)}")
            ax.set_xscale("log")
            ax.set_xlabel("peak learning rate")
            ax.set_title(mode)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("validation top-1 (mean over seeds)")
        axes[0][-1].legend(fontsize=8)
        fig.suptitle("Learning-rate sweep on the validation split")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def val_vs_k(table: list[dict[str, Any]], path: Path) -> Path | None:
    chosen = [r for r in table if r["selected"]]
    ks = _k_order(sorted({r["shots"] for r in chosen if r["shots"] is not None}))
    if not ks:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        x = list(range(len(ks)))
        for i, mode in enumerate(dict.fromkeys(r["mode"] for r in chosen)):
            rows = [r for r in chosen if r["mode"] == mode]
            if mode == "zeroshot":
                ax.axhline(rows[0]["val_top1"], color="#555555", ls=":", label="zeroshot")
                continue
            per_k = [[r["val_top1"] for r in rows if r["shots"] == k] for k in ks]
            means = [_mean(v) for v in per_k]
            lo = [min(v) if v else math.nan for v in per_k]
            hi = [max(v) if v else math.nan for v in per_k]
            c = "#000000" if mode == "scratch" else plots.color(i)
            ax.plot(x, means, marker=plots.MARKERS[i % len(plots.MARKERS)], color=c, label=mode)
            ax.fill_between(x, lo, hi, color=c, alpha=0.15, lw=0)
        ax.set_xticks(x, [plots.shots_label(k) for k in ks])
        ax.set_xlabel("training examples per class (k)")
        ax.set_ylabel("validation top-1 (mean; band: min–max over seeds)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Chosen models on the validation split")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def loss_curves(table: list[dict[str, Any]], curves: dict[str, list[float]],
                path: Path) -> Path | None:
    from upstream.finetune.config import Cell

    chosen = [r for r in table if r["selected"] and r["mode"] in TRAINED]
    if not chosen:
        return None
    modes = list(dict.fromkeys(r["mode"] for r in chosen))
    ks = _k_order(sorted({r["shots"] for r in chosen}))
    fig, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.6), dpi=100,
                             squeeze=False)
    try:
        for ax, mode in zip(axes[0], modes, strict=True):
            seen: set[int] = set()
            for r in chosen:
                if r["mode"] != mode:
                    continue
                name = Cell(r["mode"], r["shots"], r["seed"], r["lr"]).lr_name()
                losses = curves.get(name, [])
                i = ks.index(r["shots"])
                label = None if r["shots"] in seen else f"k = {plots.shots_label(r['shots'])}"
                seen.add(r["shots"])
                ax.plot(range(1, len(losses) + 1), losses, lw=0.9, color=plots.color(i),
                        label=label)
            ax.set_xlabel("step")
            ax.set_title(f"{mode} (chosen lr per k, seed)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][0].set_ylabel("training loss")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def log_grid_figures(table: list[dict[str, Any]], curves: dict[str, list[float]]) -> None:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="upstream-plot-") as tmp:
        made = [
            val_vs_k(table, Path(tmp, "val_vs_k.png")),
            val_vs_lr(table, Path(tmp, "val_vs_lr.png")),
            loss_curves(table, curves, Path(tmp, "loss_curves.png")),
        ]
        for png in made:
            if png is not None:
                mlflow.log_artifact(str(png))
