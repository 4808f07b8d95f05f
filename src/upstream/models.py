"""Image encoders for pre-training and fine-tuning, and the checkpoint files that carry them.

Every method trains the same module: an image tower inside an :class:`ImageEncoder`, which
takes images in [0, 1] and does the resizing and mean/std normalisation itself. So a saved
model needs no preprocessing recipe beside it, and fine-tuning loads the tower the same way
whichever method pre-trained it. The tower is one of two kinds, as the model's config says:

- an open_clip tower (``ModifiedResNet``, ``VisionTransformer`` or a timm trunk), built by
  open_clip's own ``_build_vision_tower``. open_clip's ``RN50`` is CLIP's *modified*
  ResNet-50 (attention pooling, 3-conv stem; 38.3M params), not torchvision's;
- a torchvision ResNet (``"torchvision_model"`` in the config's ``vision_cfg``): the torchvision
  module unchanged except that its ``fc`` is a ``Linear(trunk width, embed_dim)`` projection,
  and an ``output_dim`` attribute. Always built with ``weights=None`` (nothing is downloaded).
  ``tv-resnet50`` is torchvision's ``resnet50``: 23.5M trunk + 2.1M projection to 1024-d
  (25.6M, by chance the same as torchvision's 1000-class model);

:func:`describe_architecture` names which one a run used.

What each pre-training method trains (:func:`build_pretrain_model`); ``encoder`` is built the
same way for all three, so they train the identical tower type:

- ``clip``: a whole open_clip ``CLIP`` (image and text towers, ``logit_scale``); its
  ``visual`` is the encoder's tower. open_clip's ``create_model`` cannot build the torchvision
  configs (``CLIPVisionCfg`` refuses the unknown ``torchvision_model`` key, and ``CLIP`` a
  ``preprocess_cfg``), so for those :func:`build_clip` builds open_clip's ``CLIP`` class with a
  throwaway tiny vision config and then puts the torchvision tower in as ``visual``: the state
  dict keys, ``encode_image``/``encode_text`` and ``logit_scale`` are open_clip's. The same
  names therefore do not work in open_clip's own trainer (``upstream.openclip_compat``).
- ``simclr``: the encoder plus a :class:`ProjectionHead` (3-layer MLP with BatchNorm) on the
  encoder's ``embed_dim`` features; the contrastive loss lives with the objectives.
- ``supervised``: the encoder plus a linear head over the classes.

upstream's configs (``model_configs/*.json``) are registered with open_clip at import, so
``upstream-tiny-rn``, ``upstream-tiny-vit``, ``upstream-tiny-tvrn`` (32 px images) and
``tv-resnet50`` are listed by ``open_clip.list_models()`` and accepted wherever a model name
is. A config's top-level ``preprocess_cfg`` (mean/std) sets the encoder's normalisation:
ImageNet's for the torchvision trunks, OpenAI's CLIP statistics otherwise.

Checkpoints are ``torch.save``-d dicts of tensors, strings and numbers only, so that
``torch.load(weights_only=True)`` reads them; they are written to a local temporary file and
then copied into place, so a reader never sees half a checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
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


#: The pre-training methods :func:`build_pretrain_model` knows.
METHODS = ("clip", "simclr", "supervised")


def known_models() -> list[str]:
    """Every model name that builds here (upstream's own configs first)."""
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


def is_torchvision(name: str) -> bool:
    """True when ``name``'s image tower is a torchvision ResNet (not an open_clip tower)."""
    return bool(model_config(name)["vision_cfg"].get("torchvision_model"))


def tower_is_vit(name: str) -> bool:
    """True for a transformer image tower (it gets CLIP's ViT optimiser settings)."""
    vision = model_config(name)["vision_cfg"]
    if vision.get("torchvision_model"):
        return False
    if vision.get("timm_model_name"):
        return "vit" in vision["timm_model_name"]
    return not isinstance(vision.get("layers", 12), list | tuple)


def normalisation(name: str) -> tuple[list[float], list[float]]:
    """The image mean and std for ``name``: its config's ``preprocess_cfg``, else OpenAI's."""
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
    """The bare image tower for ``name``, freshly initialised (``output_dim`` = embed_dim).

    open_clip towers are built by the same open_clip function that builds the ``visual`` of a
    whole CLIP model, so a tower saved from any pre-training method loads into it.
    """
    from open_clip.model import _build_vision_tower

    cfg = model_config(name)
    if cfg["vision_cfg"].get("torchvision_model"):
        return _build_torchvision_trunk(name, cfg["embed_dim"], cfg["vision_cfg"])
    return _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))


def _build_torchvision_trunk(name: str, embed_dim: int, vision: dict[str, Any]) -> nn.Module:
    """torchvision's ResNet with ``fc`` = a projection to ``embed_dim``; never downloads.

    ``torchvision_model`` is a torchvision builder (``resnet50``, ``resnet18``, ...), or
    ``resnet`` for ``ResNet(block, layers)`` built directly (the tiny test config):
    torchvision's ResNet fixes the stage widths at 64..512, so a tiny one is made shallow,
    not narrow.
    """
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

    arch = vision["torchvision_model"]
    trunk: nn.Module
    if arch == "resnet":
        blocks = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}
        block = blocks.get(vision.get("block", "Bottleneck"))
        if block is None or not isinstance(vision.get("layers"), list | tuple):
            raise UpstreamError(
                f"model {name!r}: a torchvision 'resnet' needs 'block' (BasicBlock|Bottleneck) "
                "and four 'layers'"
            )
        trunk = ResNet(block, list(vision["layers"]))
    else:
        builder = getattr(torchvision.models, str(arch), None)
        if not callable(builder):
            raise UpstreamError(f"model {name!r}: torchvision has no model {arch!r}")
        trunk = builder(weights=None)
    if not isinstance(trunk, ResNet):
        raise UpstreamError(f"model {name!r}: only torchvision ResNets are supported, not {arch!r}")
    # torchvision's own classifier slot becomes the projection to the shared embedding width,
    # so forward() is torchvision's and the features match open_clip towers' embed_dim.
    trunk.fc = nn.Linear(trunk.fc.in_features, embed_dim)
    trunk.output_dim = embed_dim
    return trunk


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe_architecture(name: str, visual: nn.Module) -> str:
    """One line naming the tower a run used, with its parameter count.

    ``open_clip RN50 = ModifiedResNet, 38.32M params`` or ``torchvision resnet50 = ResNet,
    25.61M params (23.51M trunk + 2.10M projection to 1024-d), as tv-resnet50``.
    """
    n = _param_count(visual)
    vision = model_config(name)["vision_cfg"]
    tv = vision.get("torchvision_model")
    if tv:
        if tv == "resnet":
            tv = f"ResNet({vision.get('block', 'Bottleneck')}, {list(vision['layers'])})"
        fc = getattr(visual, "fc", None)
        proj = _param_count(fc) if isinstance(fc, nn.Module) else 0
        dim = getattr(visual, "output_dim", "?")
        return (
            f"torchvision {tv} = {type(visual).__name__}, {n / 1e6:.2f}M params "
            f"({(n - proj) / 1e6:.2f}M trunk + {proj / 1e6:.2f}M projection to {dim}-d), "
            f"as {name}"
        )
    trunk = vision.get("timm_model_name")
    kind = f"timm {trunk}" if trunk else type(visual).__name__
    return f"open_clip {name} = {kind}, {n / 1e6:.2f}M params"


class ImageEncoder(nn.Module):
    """An image tower that takes images in [0, 1] (N, C, H, W) and returns features.

    Grey images are repeated to three channels and other sizes are resized to the tower's
    ``image_size``, so that any of upstream's datasets fits any model; the model's mean/std
    normalisation (:func:`normalisation`) happens here, so the saved module needs no
    preprocessing beside it.
    """

    def __init__(self, visual: nn.Module, image_size: int, mean: list[float], std: list[float]):
        super().__init__()
        self.visual = visual
        self.image_size = int(image_size)
        # Not persistent: they follow from the model name, and the tower's state dict stays
        # exactly open_clip's (or torchvision's).
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


def feature_dim(encoder: ImageEncoder) -> int:
    """The width of ``encoder``'s features (its tower's ``output_dim``, else measured)."""
    out_dim = getattr(encoder.visual, "output_dim", None)
    if out_dim is None:
        with torch.no_grad():
            was = encoder.training
            encoder.eval()
            out = encoder(torch.zeros(1, 3, encoder.image_size, encoder.image_size))
            encoder.train(was)
        out_dim = out.shape[-1]
    return int(out_dim)


class Classifier(nn.Module):
    """An :class:`ImageEncoder` and a linear head: [0, 1] images in, class logits out.

    ``normalize``: the head reads L2-normalised features, as a CLIP zero-shot head does (its
    rows are normalised text embeddings times ``logit_scale``).
    """

    def __init__(self, encoder: ImageEncoder, num_classes: int, normalize: bool = False):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim(encoder), num_classes)
        self.normalize = bool(normalize)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head on features the encoder made (the same as ``forward`` on the images)."""
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return self.head(features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(self.encoder(images))


class ProjectionHead(nn.Sequential):
    """SimCLR's projection MLP: (Linear, BatchNorm, ReLU) × 2, then Linear to ``out_dim``.

    Three layers with BatchNorm, as in SimCLR v2; the Linears before a BatchNorm have no bias
    (the norm's shift replaces it). Trained with the encoder and dropped after pre-training:
    only the encoder's tower is carried to fine-tuning.

    ``hidden_dim`` 0 (the default) is the representation's own width, as SimCLR sizes it
    (Chen et al. 2020: 2048 on ResNet-50's 2048-d features, 128 out). SLIP's 4096 → 256 was
    sized for ViT-B/16's 768-d features; on a 64-d tiny tower it made the head ~18M
    parameters, 14× the tower, and most of SimCLR's step time.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 0, out_dim: int = 128):
        hidden_dim = hidden_dim or in_dim
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )
        self.in_dim, self.hidden_dim, self.out_dim = int(in_dim), int(hidden_dim), int(out_dim)


def build_image_encoder(name: str) -> ImageEncoder:
    """A fresh :class:`ImageEncoder` around ``name``'s image tower."""
    mean, std = normalisation(name)
    return ImageEncoder(build_visual(name), image_size_of(name), mean, std)


class PretrainModel(nn.Module):
    """What pre-training optimises: the encoder, plus what its method adds.

    ``clip``: ``clip`` is the whole CLIP model and ``encoder.visual`` is the very module
    ``clip.visual``. ``simclr``: ``projection`` is a :class:`ProjectionHead` on the encoder's
    features. ``supervised``: ``head`` is a linear classifier on them. The unused slots are
    None.
    """

    def __init__(
        self,
        method: str,
        encoder: ImageEncoder,
        clip: nn.Module | None = None,
        head: nn.Linear | None = None,
        projection: ProjectionHead | None = None,
    ):
        super().__init__()
        self.method = method
        self.encoder = encoder
        self.clip = clip
        self.head = head
        self.projection = projection


def tokenizer(name: str) -> CachedTokenizer:
    """open_clip's tokenizer for ``name`` (a callable: list of captions → token tensor)."""
    with _quiet_open_clip():
        return CachedTokenizer(open_clip.get_tokenizer(validate_model_name(name)))


class CachedTokenizer:
    """A tokenizer that remembers the captions it has seen (the last ``size`` distinct ones).

    open_clip's BPE tokenizer costs ~80 µs a caption here (ftfy, regex, BPE), as much as
    decoding a small image; templated captions ("a photo of a {label}.") repeat endlessly, so
    each is tokenized once. Each caption is tokenized on its own, as in a batch: the same rows.
    """

    def __init__(self, tokenize: Any, size: int = 65536) -> None:
        self.tokenize = tokenize
        self.size = size
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self.cache]
        if missing:
            if len(self.cache) + len(missing) > self.size:
                self.cache.clear()
            self.cache.update(zip(missing, self.tokenize(missing), strict=True))
        return torch.stack([self.cache[c] for c in captions])


# A throwaway vision config for open_clip's CLIP class when the real tower is torchvision's.
_PLACEHOLDER_VISION = {"image_size": 8, "patch_size": 8, "width": 8, "head_width": 8, "layers": 1}


def build_clip(name: str) -> open_clip.CLIP:
    """A fresh open_clip ``CLIP`` for ``name`` (``visual`` = :func:`build_visual`'s tower)."""
    cfg = model_config(name)
    if not cfg["vision_cfg"].get("torchvision_model"):
        with _quiet_open_clip():
            return open_clip.create_model(name, pretrained=None)
    clip = open_clip.CLIP(
        cfg["embed_dim"], _PLACEHOLDER_VISION, cfg["text_cfg"], cfg.get("quick_gelu", False)
    )
    clip.visual = build_visual(name)
    return clip


def build_pretrain_model(
    name: str,
    method: str,
    num_classes: int = 0,
    *,
    projection_hidden: int = 0,
    projection_out: int = 128,
) -> PretrainModel:
    """What ``method`` trains around ``name``'s image tower (see :class:`PretrainModel`)."""
    validate_model_name(name)
    if method == "clip":
        clip = build_clip(name)
        mean, std = normalisation(name)
        encoder = ImageEncoder(clip.visual, image_size_of(name), mean, std)
        return PretrainModel(method, encoder, clip=clip)
    if method == "simclr":
        if projection_hidden < 0 or projection_out < 1:
            raise UpstreamError(
                f"simclr projection sizes must be ≥ 1, hidden 0 for the features' width "
                f"(got hidden={projection_hidden}, "
                f"out={projection_out})"
            )
        encoder = build_image_encoder(name)
        head = ProjectionHead(feature_dim(encoder), projection_hidden, projection_out)
        return PretrainModel(method, encoder, projection=head)
    if method == "supervised":
        if num_classes < 2:
            raise UpstreamError(f"supervised pre-training needs ≥ 2 classes (got {num_classes})")
        classifier = Classifier(build_image_encoder(name), num_classes)
        return PretrainModel(method, classifier.encoder, head=classifier.head)
    raise UpstreamError(f"unknown pre-training method {method!r}; known: {', '.join(METHODS)}")


# -- checkpoint files -------------------------------------------------------------------


def resolve_file(uri: str, filename: str) -> str:
    """``uri`` itself if it names a ``.pt`` file or any existing file (so that ``ckpt.bin`` is
    read, and refused, as the file it is), else ``{uri}/{filename}``."""
    if uri.endswith(".pt") or storage.size(uri) is not None:
        return uri
    return storage.join(uri, filename)


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
        with open(local, "rb") as f:
            head = f.read(16)
        if not head.startswith(_TORCH_MAGIC):
            raise UpstreamError(f"{what} {uri} is not a readable torch file: {_not_torch(head)}")
        try:
            obj = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
            raise UpstreamError(
                f"{what} {uri} is not a readable torch file: {_load_error(e)}"
            ) from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        raise UpstreamError(f"{what} {uri} is not an {expected_format} file")
    return obj


#: How the files ``torch.save`` writes begin: a zip archive (torch ≥ 1.6), or the legacy
#: format's pickle (protocol 2 and up begin with the PROTO opcode).
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")


def _not_torch(head: bytes) -> str:
    if not head:
        return "the file is empty"
    text = head.decode("ascii", "replace")
    if all(c.isprintable() or c.isspace() for c in text):
        return f"it is text ({text.strip()[:12]!r}…), not a torch.save file"
    return f"not a torch.save file (it begins with {head[:8]!r})"


def _load_error(e: Exception) -> str:
    """The line of torch's message that says what is wrong (the weights-only unpickler puts
    the refused global on a later line of a long text)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    refused = ("WeightsUnpickler error", "unsupported GLOBAL")
    why = next((ln for ln in lines if any(r in ln for r in refused)), lines[0] if lines else "")
    # torch's zip reader appends paragraphs of advice after its first sentence.
    why = why.split(". ", 1)[0].rstrip(".")
    if isinstance(e, (KeyError, EOFError, IndexError)) or len(why) < 8:
        return f"the file is damaged or cut short ({type(e).__name__})"
    return why[:300]


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
    model = Classifier(encoder, len(obj["class_names"]), normalize=bool(obj.get("normalize")))
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


#: MLflow's switch for unpickling models; forced off by :func:`load_mlflow_model`.
ALLOW_PICKLE_VAR = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"


def log_mlflow_model(
    model: nn.Module, image_size: int, out_dim: int, registered_name: str | None = None
) -> None:
    """Log ``model`` (takes [0, 1] images) as the run's ``model`` with a tensor signature;
    with ``registered_name``, also as a new version of that model in the model registry.

    The format is MLflow's ``pt2``: a ``torch.export`` archive (the traced graph, weights as
    raw tensor bytes), which loads without unpickling anything, so that a replaced artifact
    cannot run code in whoever loads it with :func:`load_mlflow_model` (or with
    ``mlflow.pytorch.load_model`` under ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``). Pickle,
    MLflow's other choice, runs whatever the file says; state dicts plus a loader would need
    the loader's code logged beside them, which a replaced artifact could change just as
    well. What a pt2 model gives back is the graph (a ``torch.fx.GraphModule`` with the same
    parameter names and outputs), not upstream's classes: upstream itself reloads its own
    model files (``weights_only``), never MLflow's. Exporting costs ~1 s for the tiny models
    here; every upstream tower exports (tiny-rn, tiny-vit, tiny-tvrn, tv-resnet50, RN50,
    ViT-B-32 checked). The batch dimension stays dynamic (the example has two rows).
    """
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
    try:
        mlflow.pytorch.log_model(
            model,
            name="model",
            serialization_format="pt2",
            input_example=np.zeros((2, 3, image_size, image_size), dtype=np.float32),
            pip_requirements=pip_requirements(),
            signature=signature,
            registered_model_name=registered_name,
        )
    finally:
        model.train(was)


def load_mlflow_model(uri: str) -> nn.Module:
    """The model logged at ``uri`` (``runs:/…/model``, ``models:/NAME/VERSION``, a folder),
    loaded without unpickling anything: a pt2 archive is checked to hold no pickle first, and
    a model in pickle format (an old upstream's, or a planted ``model.pth``) is refused, one
    line naming ``uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    old = os.environ.get(ALLOW_PICKLE_VAR)
    os.environ[ALLOW_PICKLE_VAR] = "false"
    try:
        return mlflow.pytorch.load_model(uri)  # type: ignore[no-any-return]
    except MlflowException as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UpstreamError(f"model {uri} was not loaded: {first}") from None
    finally:
        if old is None:
            os.environ.pop(ALLOW_PICKLE_VAR, None)
        else:
            os.environ[ALLOW_PICKLE_VAR] = old
