"""Image encoders for pre-training and fine-tuning, and the checkpoint files that carry them.

Every method trains the same module: an open_clip image tower (``ModifiedResNet``,
``VisionTransformer`` or a timm trunk, as the open_clip config says) inside an
:class:`ImageEncoder`, which takes images in [0, 1] and does the resizing and open_clip's
mean/std normalisation itself. So a saved model needs no preprocessing recipe beside it, and
fine-tuning loads the tower the same way whichever method pre-trained it.

- ``clip``: the whole open_clip model (image and text towers, ``logit_scale``); its
  ``visual`` is the encoder's tower.
- ``supervised``: the encoder plus a linear head over the classes.

upstream's tiny configs (``model_configs/*.json``, 32 px images) are registered with
open_clip at import, so ``upstream-tiny-rn`` and ``upstream-tiny-vit`` work wherever an
open_clip name does.

Checkpoints are ``torch.save``-d dicts of tensors, strings and numbers only, so that
``torch.load(weights_only=True)`` reads them; they are written to a local temporary file and
then copied into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from upstream import storage
from upstream.errors import UpstreamError

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

#: Value of the ``format`` key of a pre-training checkpoint.
CHECKPOINT_FORMAT = "upstream-checkpoint"
#: Value of the ``format`` key of a fine-tuned model file.
MODEL_FORMAT = "upstream-model"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_FILE = "model.pt"
FORMAT_VERSION = 1

# Names that need something we cannot reach offline (a hub download) are not offered.
_REMOTE_PREFIXES = ("hf-hub:", "local-dir:")


def known_models() -> list[str]:
    """Every open_clip model name that builds here (upstream's tiny configs first)."""
    names = open_clip.list_models()
    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    return ours + [n for n in names if n not in ours]


def validate_model_name(name: str) -> str:
    """Return ``name`` if open_clip can build it, else raise a one-line :class:`UpstreamError`."""
    if name in open_clip.list_models() and not name.startswith(_REMOTE_PREFIXES):
        return name
    known = known_models()
    shown = [n for n in known if n.startswith("upstream-")] + ["RN50", "RN101", "ViT-B-32"]
    raise UpstreamError(
        f"unknown model {name!r}; known: {', '.join(shown)}, ... "
        f"({len(known)} in all, see open_clip.list_models())"
    )


def model_config(name: str) -> dict[str, Any]:
    cfg = open_clip.get_model_config(validate_model_name(name))
    assert cfg is not None
    return cfg


def image_size_of(name: str) -> int:
    size = model_config(name)["vision_cfg"].get("image_size", 224)
    if isinstance(size, list | tuple):
        if size[0] != size[1]:
            raise UpstreamError(f"model {name!r}: only square images are supported (got {size})")
        size = size[0]
    return int(size)


def embed_dim_of(name: str) -> int:
    return int(model_config(name)["embed_dim"])


def tower_is_vit(name: str) -> bool:
    """True for a transformer image tower (it gets CLIP's ViT optimiser settings)."""
    vision = model_config(name)["vision_cfg"]
    if vision.get("timm_model_name"):
        return "vit" in vision["timm_model_name"]
    return not isinstance(vision.get("layers", 12), list | tuple)


def normalisation(name: str) -> tuple[list[float], list[float]]:
    """open_clip's image mean and std for ``name`` (the config's, else OpenAI's)."""
    pp = model_config(name).get("preprocess_cfg", {})
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    return [float(m) for m in mean], [float(s) for s in std]


class _DropOpenClipChatter(logging.Filter):
    """Drops open_clip's INFO records and its warning that a model has no weights."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "open_clip" not in record.pathname:
            return True
        if "No pretrained weights loaded" in record.getMessage():
            return False  # random initialisation is the point of pre-training
        return record.levelno >= logging.WARNING


class _DropMessage(logging.Filter):
    """Drops log records whose message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    # open_clip logs through the root logger, so its step-by-step INFO lines ("Parsing
    # tokenizer identifier ...") would fill every stage's log at the CLI's INFO level.
    f = _DropOpenClipChatter()
    logging.getLogger().addFilter(f)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(f)


def build_visual(name: str) -> nn.Module:
    """The bare open_clip image tower for ``name``, freshly initialised.

    Built by the same open_clip function that builds the ``visual`` of a whole CLIP model, so
    a tower saved from either pre-training method loads into it.
    """
    from open_clip.model import _build_vision_tower

    cfg = model_config(name)
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))


def describe_architecture(name: str, visual: nn.Module) -> str:
    """A one-line description such as ``open_clip RN50 = ModifiedResNet, 38.3M params``."""
    n = sum(p.numel() for p in visual.parameters())
    trunk = model_config(name)["vision_cfg"].get("timm_model_name")
    kind = f"timm {trunk}" if trunk else type(visual).__name__
    return f"open_clip {name} = {kind}, {n / 1e6:.2f}M params"


class ImageEncoder(nn.Module):
    """An image tower that takes images in [0, 1] (N, C, H, W) and returns features.

    Grey images are repeated to three channels and other sizes are resized to the tower's
    ``image_size``, so that any of upstream's datasets fits any model; open_clip's mean/std
    normalisation happens here, so the saved module needs no preprocessing beside it.
    """

    def __init__(self, visual: nn.Module, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.visual = visual
        self.image_size = int(image_size)
        # Not persistent: they follow from the model name, and the tower's state dict stays
        # exactly open_clip's.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(
                images, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        return self.visual((images - self.mean) / self.std)


class Classifier(nn.Module):
    """An :class:`ImageEncoder` and a linear head: [0, 1] images in, class logits out."""

    def __init__(self, encoder: ImageEncoder, num_classes: int):
        super().__init__()
        self.encoder = encoder
        out_dim = getattr(encoder.visual, "output_dim", None)
        if out_dim is None:
            with torch.no_grad():
                was = encoder.training
                encoder.eval()
                out_dim = encoder(torch.zeros(1, 3, encoder.image_size, encoder.image_size))
                out_dim = out_dim.shape[-1]
                encoder.train(was)
        self.head = nn.Linear(int(out_dim), num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images))


def build_image_encoder(name: str) -> ImageEncoder:
    """A fresh :class:`ImageEncoder` around ``name``'s open_clip image tower."""
    mean, std = normalisation(name)
    return ImageEncoder(build_visual(name), image_size_of(name), mean, std)


class PretrainModel(nn.Module):
    """What pre-training optimises: the encoder, plus a text tower (clip) or a head (supervised).

    ``encoder.visual`` is the open_clip image tower in both cases; for ``clip`` it is the very
    module ``clip.visual``.
    """

    def __init__(
        self,
        method: str,
        encoder: ImageEncoder,
        clip: nn.Module | None = None,
        head: nn.Linear | None = None,
    ):
        super().__init__()
        self.method = method
        self.encoder = encoder
        self.clip = clip
        self.head = head


def tokenizer(name: str) -> Any:
    """open_clip's tokenizer for ``name`` (a callable: list of captions → token tensor)."""
    with _quiet_open_clip():
        return open_clip.get_tokenizer(validate_model_name(name))


def build_pretrain_model(name: str, method: str, num_classes: int = 0) -> PretrainModel:
    """What ``method`` trains: clip → the whole open_clip model; supervised → tower + head."""
    validate_model_name(name)
    mean, std = normalisation(name)
    if method == "clip":
        with _quiet_open_clip():
            clip = open_clip.create_model(name, pretrained=None)
        encoder = ImageEncoder(clip.visual, image_size_of(name), mean, std)
        return PretrainModel(method, encoder, clip=clip)
    if method == "supervised":
        if num_classes < 2:
            raise UpstreamError(f"supervised pre-training needs ≥ 2 classes (got {num_classes})")
        classifier = Classifier(build_image_encoder(name), num_classes)
        return PretrainModel(method, classifier.encoder, head=classifier.head)
    raise UpstreamError(f"unknown pre-training method {method!r}; known: clip, supervised")


# -- checkpoint files -------------------------------------------------------------------


def resolve_file(uri: str, filename: str) -> str:
    """``uri`` itself if it names a ``.pt`` file, else ``{uri}/{filename}``."""
    return uri if uri.endswith(".pt") else storage.join(uri, filename)


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of detached, contiguous CPU tensors (safe for ``weights_only`` loading)."""
    # No copies: on the CPU these share storage with the module, and torch.save writes a
    # storage shared by two entries (the clip model and its tower) only once.
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_file(obj: dict[str, Any], uri: str) -> None:
    """``torch.save`` ``obj`` to ``uri`` (local or s3://): temp file first, then into place."""
    with tempfile.TemporaryDirectory(prefix="upstream-save-") as tmp:
        local = Path(tmp, Path(uri).name or "file.pt")
        torch.save(obj, local)
        storage.upload_file(local, uri)


def load_file(uri: str, expected_format: str, what: str) -> dict[str, Any]:
    """Read an upstream ``.pt`` file with ``weights_only=True`` and check its format."""
    if not storage.exists(uri):
        raise UpstreamError(f"{what} {uri} does not exist")
    with tempfile.TemporaryDirectory(prefix="upstream-load-") as tmp:
        local = storage.download_file(uri, Path(tmp, "file.pt"))
        try:
            obj = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UpstreamError(f"{what} {uri} is not a readable torch file: {first}") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        raise UpstreamError(f"{what} {uri} is not an {expected_format} file")
    return obj


def load_checkpoint(uri: str) -> dict[str, Any]:
    """A pre-training checkpoint (``uri`` is the file or the folder holding checkpoint.pt)."""
    return load_file(resolve_file(uri, CHECKPOINT_FILE), CHECKPOINT_FORMAT, "checkpoint")


def load_model_file(uri: str) -> dict[str, Any]:
    """A fine-tuned model file (``uri`` is the file or the folder holding model.pt)."""
    return load_file(resolve_file(uri, MODEL_FILE), MODEL_FORMAT, "model")


def encoder_from_state(name: str, visual_state: dict[str, torch.Tensor]) -> ImageEncoder:
    """An :class:`ImageEncoder` for ``name`` holding the saved tower weights."""
    encoder = build_image_encoder(name)
    try:
        encoder.visual.load_state_dict(visual_state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UpstreamError(f"saved image tower does not fit model {name!r}: {first}") from None
    return encoder


def classifier_from_model_file(obj: dict[str, Any]) -> Classifier:
    """Rebuild the fine-tuned :class:`Classifier` from a loaded model file."""
    encoder = encoder_from_state(obj["model_name"], obj["visual"])
    model = Classifier(encoder, len(obj["class_names"]))
    model.head.load_state_dict({"weight": obj["head_weight"], "bias": obj["head_bias"]})
    return model


def pip_requirements() -> list[str]:
    """What a logged model needs to load (passed explicitly: MLflow's inference takes ~8 s)."""
    import importlib.metadata as md

    out = []
    for pkg in ("torch", "torchvision", "open-clip-torch", "numpy", "cloudpickle"):
        try:
            version = md.version(pkg).split("+")[0]
        except md.PackageNotFoundError:
            continue
        out.append(f"{pkg}=={version}")
    return out


def log_mlflow_model(model: nn.Module, image_size: int, out_dim: int) -> None:
    """Log ``model`` (takes [0, 1] images) as the run's ``model`` with a tensor signature."""
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, image_size, image_size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, out_dim))]),
    )
    was = model.training
    model.eval()
    # Pickle is chosen on purpose (open_clip towers do not all torch.export), so mlflow's
    # warning about it would only repeat itself in every stage's log.
    quiet = _DropMessage("Saving pytorch model by Pickle")
    logging.getLogger("mlflow.pytorch").addFilter(quiet)
    try:
        mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pickle",
            pip_requirements=pip_requirements(),
            signature=signature,
        )
    finally:
        logging.getLogger("mlflow.pytorch").removeFilter(quiet)
        model.train(was)
