"""Fine-tuning stage: every transfer mode of the papers over a few-shot grid (modes × k shots
× seeds × learning rates), each model chosen on a validation split.

The modes (``modes``, a comma list):

- ``lp``: a logistic-regression probe on the frozen tower's eval-mode features, C over
  ``logspace(-7, 2, probe_c_points)`` chosen on the validation split (Kumar et al., 2022);
- ``ft``: full fine-tuning from a zero head;
- ``lp-ft``: LP, then full fine-tuning from the probe's head (Kumar et al.);
- ``zeroshot``: a CLIP checkpoint's zero-shot head (the text tower's embeddings of the class
  names in prompt templates), scored without training; ``zeroshot-ft``: that head, then full
  fine-tuning (Entezari et al.'s CLIP setup, as WiSE-FT builds it);
- ``scratch``: the same tower from random initialisation, trained like ``ft`` with BatchNorm
  in training mode: the baseline of every comparison. It takes ``model`` (a tower name), not
  a checkpoint, so it runs in a call of its own.

Optimiser recipes come from ``preset`` (``default``, ``entezari``, ``kumar``); every field a
preset sets can still be set on its own (the sentinel values ``preset``, ``0`` or ``-1`` mean
"the preset's").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from upstream.config import StageConfig, split_list, wiring

MODES = ("lp", "ft", "lp-ft", "zeroshot", "zeroshot-ft", "scratch")
#: Modes that train the whole network (one run per learning rate).
TRAINED = ("ft", "lp-ft", "zeroshot-ft", "scratch")
#: Modes that need the checkpoint's text tower.
ZERO_SHOT = ("zeroshot", "zeroshot-ft")
#: Kumar et al.'s probe grid is ``logspace(-7, 2, 50)``: inverse L2 strengths on
#: standardised features.
PROBE_C_RANGE = (-7.0, 2.0)


@dataclasses.dataclass(frozen=True)
class Preset:
    """An optimiser recipe: what a preset sets unless a field overrides it."""

    optimizer: str
    weight_decay: float
    batch_size: int
    epochs: int
    #: Linear warmup steps; None = ``warmup_fraction`` of the run's steps.
    warmup_steps: int | None
    batchnorm: str
    #: Learning rates for a pre-trained tower, and for ``scratch`` (random initialisation).
    lrs: tuple[float, ...]
    scratch_lrs: tuple[float, ...]
    source: str
    #: Steps a run takes at least (more epochs when k is small): a 1-shot set of 10 classes
    #: is one step an epoch, and 10 steps leave a scratch model at chance.
    min_steps: int = 0
    #: Warmup never takes more than this share of a run's steps. The papers' downstream runs
    #: are thousands of steps long; a few-shot run of a hundred steps would otherwise never
    #: leave its warmup.
    warmup_fraction: float = 0.1


PRESETS: dict[str, Preset] = {
    # upstream's own default before presets existed: AdamW, a short warmup, BatchNorm frozen.
    "default": Preset("adamw", 0.0, 64, 10, None, "frozen", (1e-5,), (1e-3,),
                      "upstream's default: AdamW, 10% warmup, cosine, BatchNorm frozen, at "
                      "least 200 steps", min_steps=200),
    # Entezari et al. 2023: AdamW, wd 0.1, batch 128, 128 epochs, 500 warmup steps, cosine,
    # lr from {1e-4, 3e-4, 1e-3, 3e-3} for pre-trained and scratch models alike.
    "entezari": Preset("adamw", 0.1, 128, 128, 500, "train",
                       (1e-4, 3e-4, 1e-3, 3e-3), (1e-4, 3e-4, 1e-3, 3e-3),
                       "Entezari et al. 2023: AdamW wd 0.1, batch 128, 128 epochs, "
                       "500 warmup steps, cosine"),
    # Kumar et al. 2022 (LP-FT): SGD momentum 0.9, no weight decay, cosine, the network in
    # eval mode (BatchNorm statistics frozen), lr swept 3e-7 ... 1e-2. Their epochs and batch
    # are per data set; upstream keeps its default 10 and 64.
    "kumar": Preset("sgd", 0.0, 64, 10, 0, "frozen",
                    (3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
                    (1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
                    "Kumar et al. 2022: SGD momentum 0.9, no weight decay, cosine, "
                    "BatchNorm frozen", min_steps=200),
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The optimiser settings a run uses: the preset, with the config's overrides applied."""

    preset: str
    optimizer: str
    weight_decay: float
    batch_size: int
    epochs: int
    warmup_steps: int | None
    warmup_fraction: float
    batchnorm: str
    grad_clip: float
    min_steps: int = 0

    def epochs_for(self, steps_per_epoch: int) -> int:
        """Epochs of a run: the recipe's, or more to reach ``min_steps``."""
        return max(self.epochs, math.ceil(self.min_steps / max(1, steps_per_epoch)))

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``: the recipe's, at most its share."""
        cap = int(self.warmup_fraction * total_steps)
        return cap if self.warmup_steps is None else min(self.warmup_steps, cap)

    def params(self) -> dict[str, str]:
        return {f"recipe.{k}": str(v) for k, v in dataclasses.asdict(self).items()}


def _floats(text: str) -> list[float]:
    return [float(x) for x in split_list(text)]


def _ints(text: str) -> list[int]:
    return [int(x) for x in split_list(text)]


def _check_ints(v: str, what: str, kind: str, negative: bool) -> str:
    """A comma list of distinct integers, at least one (a field validator's check)."""
    parts = split_list(v)
    if not parts:
        raise ValueError(f"name at least one {what}")
    for part in parts:
        if not (part.lstrip("-") if negative else part).isdigit():
            raise ValueError(f"each {what} is {kind} (got {part!r})")
    if len(set(_ints(v))) != len(parts):
        raise ValueError(f"a {what} is listed twice")
    return v


class FinetuneConfig(StageConfig):
    stage: ClassVar[str] = "finetune"
    not_decisive: ClassVar[frozenset[str]] = frozenset(
        {"output", "experiment", "feature_cache", "keep_models"}
    )

    pretrained: str = wiring(
        "", description="Pre-trained checkpoint (file or its folder); empty for scratch."
    )
    data: str = wiring(description="Downstream training shards: the folder holding manifest.json.")
    output: str = wiring("", description="Where the fine-tuned models and grid.json go.")
    feature_cache: str = wiring(
        "", description="Folder (or s3:// prefix) of cached frozen features, keyed by tower and "
        "data fingerprints (default: $UPSTREAM_HOME/cache/features)."
    )
    modes: str = Field(
        "lp-ft",
        description="Comma list of modes: lp (probe), ft (from a zero head), lp-ft (from the "
        "probe's head), zeroshot and zeroshot-ft (CLIP checkpoints: the text tower's head), "
        "scratch (random initialisation; takes model, not a checkpoint).",
    )
    model: str = Field(
        "", description="scratch: the image tower to train from random initialisation (a "
        "model name as for pretrain). Other modes take the checkpoint's."
    )
    shots: str = Field(
        "0", description="Comma list of training examples per class (k); 0 = all (full-shot)."
    )
    seeds: str = Field(
        "0", description="Comma list of seeds: each draws its own k-shot sample and validation "
        "split and seeds training."
    )
    lrs: str = Field(
        "", description="Comma list of peak learning rates to choose from on the validation "
        "split (empty: the preset's grid)."
    )
    preset: Literal["default", "entezari", "kumar"] = Field(
        "default",
        description="Optimiser recipe: default (AdamW, wd 0, batch 64, 10 epochs and at least "
        "200 steps, 10% warmup, BatchNorm frozen), entezari (AdamW wd 0.1, batch 128, 128 "
        "epochs, 500 warmup steps), kumar (SGD momentum 0.9, no wd, BatchNorm frozen, at least "
        "200 steps); all cosine.",
    )
    optimizer: Literal["preset", "adamw", "sgd"] = Field(
        "preset", description="Optimiser (preset: the preset's)."
    )
    epochs: int = Field(0, ge=0, description="Fine-tuning epochs (0: the preset's).")
    batch_size: int = Field(0, ge=0, description="Samples per step (0: the preset's).")
    weight_decay: float = Field(
        -1.0, description="Weight decay, not on norms and biases (negative: the preset's)."
    )
    warmup_steps: int = Field(
        -1, description="Linear warmup steps before the cosine decay, at most a tenth of the "
        "run (negative: the preset's)."
    )
    batchnorm: Literal["preset", "frozen", "train"] = Field(
        "preset", description="BatchNorm statistics while fine-tuning: frozen (eval mode, as "
        "Kumar et al.'s LP-FT) or train. scratch always trains them."
    )
    grad_clip: float = Field(0.0, ge=0, description="Clip the gradient norm to this (0: off).")
    min_steps: int = Field(
        -1, description="Steps a run takes at least, epochs repeated when k is small "
        "(negative: the preset's; default 200, entezari 0)."
    )
    val_per_class: int = Field(
        10, ge=0,
        description="Validation examples per class, drawn from the training data outside the "
        "k-shot sample; the learning rate and the probe's C are chosen on them.",
    )
    probe_c_points: int = Field(
        20, ge=1, description="Points of the probe's C grid, logspace(-7, 2, N) as Kumar et al. "
        "(they use 50)."
    )
    templates: str = Field(
        "clip",
        description="zeroshot modes: prompt templates for the class names: clip (CLIP's 80 "
        "ImageNet templates), simple ('a photo of a {label}.'), or templates containing "
        "{label} separated by '|'.",
    )
    keep_models: Literal["selected", "all"] = Field(
        "selected", description="Model files to keep: the one chosen per (mode, k, seed), or "
        "every learning rate's."
    )
    experiment: str = Field("upstream", description="MLflow experiment name.")

    @field_validator("shots", "seeds", "lrs", mode="before")
    @classmethod
    def _one_number(cls, v: object) -> object:
        # A single k, seed or lr given as a number (``finetune_shots=10`` from Python).
        return str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: str) -> str:
        modes = split_list(v)
        if not modes:
            raise ValueError("name at least one mode")
        for m in modes:
            if m not in MODES:
                raise ValueError(f"unknown mode {m!r} (one of {', '.join(MODES)})")
        if len(set(modes)) != len(modes):
            raise ValueError("a mode is listed twice")
        return v

    @field_validator("shots")
    @classmethod
    def _shots(cls, v: str) -> str:
        return _check_ints(v, "k", "an integer ≥ 0 (0 = all)", negative=False)

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: str) -> str:
        return _check_ints(v, "seed", "an integer", negative=True)

    @field_validator("lrs")
    @classmethod
    def _lrs(cls, v: str) -> str:
        for part in split_list(v):
            try:
                lr = float(part)
            except ValueError:
                raise ValueError(f"not a number: {part!r}") from None
            if not (lr > 0 and math.isfinite(lr)):
                raise ValueError(f"learning rates must be positive (got {part})")
        if len(set(_floats(v))) != len(split_list(v)):
            raise ValueError("a learning rate is listed twice")
        return v

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: str) -> str:
        if v not in ("clip", "simple"):
            for t in v.split("|"):
                if "{label}" not in t:
                    raise ValueError(f"a template must contain {{label}} (got {t!r})")
        return v

    @model_validator(mode="after")
    def _scratch_alone(self) -> FinetuneConfig:
        modes = self.mode_list
        if "scratch" in modes:
            if len(modes) > 1:
                raise ValueError(
                    "scratch trains from random initialisation and takes no checkpoint: give "
                    "it a finetune call of its own (modes=scratch)"
                )
            if self.pretrained:
                raise ValueError("scratch takes model (a tower name), not a pre-trained "
                                 f"checkpoint (got pretrained={self.pretrained!r})")
            if not self.model:
                raise ValueError("scratch needs model: the tower to train from random "
                                 "initialisation (e.g. upstream-tiny-rn)")
            if self.batchnorm == "frozen":
                raise ValueError("scratch trains BatchNorm statistics (a random tower's are "
                                 "meaningless frozen): leave batchnorm at preset or train")
            from upstream.pretrain.stage import _model_config_names

            if self.model not in _model_config_names():
                raise ValueError(f"unknown model {self.model!r} (see open_clip.list_models())")
        elif self.model:
            raise ValueError("model is for scratch only; other modes use the checkpoint's tower")
        if self.val_per_class == 0 and self.needs_selection:
            raise ValueError("choosing a learning rate or the probe's C needs a validation "
                             "split: set val_per_class ≥ 1 (or one lr and probe_c_points=1)")
        return self

    # -- the grid, parsed --------------------------------------------------------------------

    @property
    def mode_list(self) -> list[str]:
        return split_list(self.modes)

    @property
    def shot_list(self) -> list[int]:
        return _ints(self.shots)

    @property
    def seed_list(self) -> list[int]:
        return _ints(self.seeds)

    @property
    def needs_selection(self) -> bool:
        probe = any(m in ("lp", "lp-ft") for m in self.mode_list) and self.probe_c_points > 1
        trained = any(m in TRAINED for m in self.mode_list)
        return probe or (trained and len(self.lr_list) > 1)

    @property
    def lr_list(self) -> list[float]:
        if self.lrs:
            return _floats(self.lrs)
        p = PRESETS[self.preset]
        return list(p.scratch_lrs if "scratch" in self.mode_list else p.lrs)

    @property
    def c_grid(self) -> list[float]:
        lo, hi = PROBE_C_RANGE
        n = self.probe_c_points
        return [10 ** (lo + (hi - lo) * i / (n - 1)) for i in range(n)] if n > 1 else [1.0]

    def recipe(self) -> Recipe:
        p = PRESETS[self.preset]
        batchnorm = self.batchnorm if self.batchnorm != "preset" else p.batchnorm
        if "scratch" in self.mode_list:
            batchnorm = "train"
        return Recipe(
            preset=self.preset,
            optimizer=self.optimizer if self.optimizer != "preset" else p.optimizer,
            weight_decay=self.weight_decay if self.weight_decay >= 0 else p.weight_decay,
            batch_size=self.batch_size or p.batch_size,
            epochs=self.epochs or p.epochs,
            warmup_steps=self.warmup_steps if self.warmup_steps >= 0 else p.warmup_steps,
            warmup_fraction=p.warmup_fraction,
            batchnorm=batchnorm,
            grad_clip=self.grad_clip,
            min_steps=self.min_steps if self.min_steps >= 0 else p.min_steps,
        )

    def cells(self) -> list[Cell]:
        """Every (mode, k, seed, lr) of the grid, in the order they run: grouped by (k, seed)
        so that one split and one probe serve all its modes. ``zeroshot`` trains nothing and
        uses no labelled example, so it is one cell whatever the shots and seeds."""
        out: list[Cell] = []
        if "zeroshot" in self.mode_list:
            out.append(Cell("zeroshot", None, None, None))
        for k in self.shot_list:
            for seed in self.seed_list:
                for mode in self.mode_list:
                    if mode == "zeroshot":
                        continue
                    if mode in TRAINED:
                        out.extend(Cell(mode, k, seed, lr) for lr in self.lr_list)
                    else:
                        out.append(Cell(mode, k, seed, None))
        return out


@dataclasses.dataclass(frozen=True)
class Cell:
    """One configuration of the grid. ``shots``/``seed`` are None for ``zeroshot`` (no
    labelled example is used), ``lr`` is None for modes that do not train."""

    mode: str
    shots: int | None
    seed: int | None
    lr: float | None

    @property
    def group(self) -> tuple[str, int | None, int | None]:
        """The (mode, k, seed) a learning rate is chosen within."""
        return (self.mode, self.shots, self.seed)

    @property
    def name(self) -> str:
        """A path-safe name: ``lp-ft-k5-s0`` (the group) or ``zeroshot``."""
        if self.shots is None:
            return self.mode
        return f"{self.mode}-k{self.shots}-s{self.seed}"

    def lr_name(self) -> str:
        return self.name + (f"-lr{self.lr:g}" if self.lr is not None else "")

    def tags(self) -> dict[str, Any]:
        return {
            "upstream.mode": self.mode,
            "upstream.shots": "none" if self.shots is None else str(self.shots),
            "upstream.seed": "none" if self.seed is None else str(self.seed),
            "upstream.lr": "none" if self.lr is None else f"{self.lr:g}",
        }
