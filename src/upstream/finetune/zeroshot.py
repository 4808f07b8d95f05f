"""The zero-shot head of a CLIP checkpoint: its text tower's embeddings of the class names in
prompt templates (open_clip's ``build_zero_shot_classifier``), scaled by the learned
``logit_scale`` and applied to L2-normalised image features, as WiSE-FT builds the head that
Entezari et al.'s CLIP fine-tuning starts from."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from upstream.errors import UpstreamError

if TYPE_CHECKING:
    import torch

SIMPLE = ("a photo of a {label}.",)


def templates_for(setting: str) -> list[str]:
    """The prompt templates a ``templates`` setting names (each holds ``{label}``)."""
    if setting == "simple":
        return list(SIMPLE)
    if setting == "clip":
        import open_clip

        # open_clip ships CLIP's 80 ImageNet templates as callables; render them once.
        return [t("{label}") for t in open_clip.OPENAI_IMAGENET_TEMPLATES]
    return [t.strip() for t in setting.split("|") if t.strip()]


def check_checkpoint(ckpt: dict[str, Any], uri: str) -> None:
    if "clip" not in ckpt:
        raise UpstreamError(
            f"finetune: zeroshot modes need a CLIP checkpoint with a text tower; {uri} was "
            f"pre-trained with {ckpt.get('method', '?')} and has none"
        )


def zero_shot_head(ckpt: dict[str, Any], class_names: list[str],
                   templates: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (classes × embed_dim), bias) of the zero-shot head, on normalised features."""
    import open_clip
    import torch

    from upstream import models

    clip = models.build_clip(ckpt["model_name"])
    clip.load_state_dict(ckpt["clip"])
    clip.eval()
    tokenizer = models.tokenizer(ckpt["model_name"])
    # Class names as people write them: "sea_turtle" and "sea-turtle" read "sea turtle".
    readable = [c.replace("_", " ") for c in class_names]
    prompts = [lambda c, t=t: t.replace("{label}", c) for t in templates]
    weights = open_clip.build_zero_shot_classifier(
        clip, tokenizer, readable, prompts, num_classes_per_batch=10, device="cpu",
        use_tqdm=False,
    )
    scale = float(clip.logit_scale.exp().clamp(max=100).item())
    weight = (weights.T * scale).float().contiguous()
    return weight, torch.zeros(len(class_names))
