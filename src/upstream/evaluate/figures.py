"""The figure an evaluation run logs per model when it scored a corruption suite: top-1 per
corruption and severity."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from upstream import plots
from upstream.evaluate.sets import EvalSet

plt = plots.plt


def corruption_heatmap(sets: list[EvalSet], scored: dict[str, dict[str, Any]], clean: float,
                       path: Path, metric: str = "top1") -> Path:
    """Rows: corruptions (ImageNet-C order), columns: severities; cells: the metric."""
    import numpy as np

    names = list(dict.fromkeys(s.name.rsplit("-", 1)[0] for s in sets))
    severities = sorted({s.severity for s in sets})
    grid = np.full((len(names), len(severities)), np.nan)
    for s in sets:
        grid[names.index(s.name.rsplit("-", 1)[0]), severities.index(s.severity)] = \
            scored[s.name][metric]
    fig, ax = plt.subplots(figsize=(2.2 + 0.7 * len(severities), 1.4 + 0.32 * len(names)),
                           dpi=100)
    try:
        im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
        fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, label=metric)
        ax.set_xticks(range(len(severities)), [str(v) for v in severities])
        ax.set_yticks(range(len(names)), names)
        for r in range(len(names)):
            for c in range(len(severities)):
                if np.isfinite(grid[r, c]):
                    ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[r, c] < 0.6 else "black")
        ax.set_xlabel("severity")
        ax.set_title(f"{metric} under corruption (clean: {clean:.2f})")
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
