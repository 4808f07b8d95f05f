"""Figures the stages log to MLflow: loss curves and confusion matrices (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: stages run in containers and CI without a display

import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first

#: Okabe & Ito's colour-blind-safe palette (black last: it marks the scratch baseline).
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442",
           "#000000")
#: Markers that tell series apart without colour.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def color(i: int) -> str:
    """The i-th palette colour, skipping black (kept for baselines)."""
    return PALETTE[i % (len(PALETTE) - 1)]


def shots_label(k: int | None) -> str:
    return "all" if k == 0 else ("zero-shot" if k is None else str(k))


def loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | Path,
    title: str = "training loss",
    xlabel: str = "step",
) -> Path:
    """Plot loss against step (raw and a running mean) into ``path`` (PNG); return the path."""
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
                for i in range(len(losses))
            ]
            ax.plot(steps, smooth, lw=1.5, label=f"running mean ({window})")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def confusion_matrix(
    matrix: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | Path,
    title: str = "confusion matrix",
) -> Path:
    """Plot a confusion matrix (rows: true class, columns: predicted) into ``path`` (PNG)."""
    path = Path(path)
    n = len(class_names)
    side = min(12.0, 3.0 + 0.4 * n)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    try:
        im = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        if n <= 30:
            ax.set_xticks(range(n), class_names, rotation=90)
            ax.set_yticks(range(n), class_names)
            if n <= 15:
                top = max((max(row) for row in matrix), default=0) or 1
                for i, row in enumerate(matrix):
                    for j, v in enumerate(row):
                        color = "white" if v > top / 2 else "black"
                        ax.text(j, i, str(v), ha="center", va="center", color=color, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
