"""Fine-tuning: every transfer mode of the papers over a few-shot grid.

- :mod:`~upstream.finetune.config`: the stage's config, its modes and optimiser presets;
- :mod:`~upstream.finetune.splits`: the k-shot sample and the validation split;
- :mod:`~upstream.finetune.features`: frozen features and their stored cache;
- :mod:`~upstream.finetune.probe`: the logistic-regression probe (LP);
- :mod:`~upstream.finetune.zeroshot`: a CLIP checkpoint's zero-shot head;
- :mod:`~upstream.finetune.train`: full fine-tuning of one cell;
- :mod:`~upstream.finetune.grid`: one call's grid, its MLflow runs and the choice of lr;
- :mod:`~upstream.finetune.figures`: the grid's plots.
"""

from upstream.finetune.config import MODES, PRESETS, FinetuneConfig
from upstream.finetune.features import extract_features
from upstream.finetune.grid import finetune, read_grid
from upstream.finetune.probe import fit_probe

__all__ = ["MODES", "PRESETS", "FinetuneConfig", "extract_features", "finetune", "fit_probe",
           "read_grid"]
