"""The three pre-training methods train the identical image tower, open_clip's or torchvision's."""

from __future__ import annotations

import math
from pathlib import Path

import open_clip
import pytest
import torch
import torchvision

from upstream import models
from upstream.errors import UpstreamError

TINY = ["upstream-tiny-tvrn", "upstream-tiny-rn"]
IMAGENET_MEAN = [0.485, 0.456, 0.406]


def _build_all(name: str) -> dict[str, models.PretrainModel]:
    return {
        "clip": models.build_pretrain_model(name, "clip"),
        "simclr": models.build_pretrain_model(name, "simclr", projection_hidden=128),
        "supervised": models.build_pretrain_model(name, "supervised", num_classes=5),
    }


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", TINY)
def test_three_methods_build_the_identical_tower_and_run(name: str) -> None:
    torch.manual_seed(0)
    nets = _build_all(name)
    towers = {method: net.encoder.visual for method, net in nets.items()}
    assert len({type(t) for t in towers.values()}) == 1
    assert len({tuple(_shapes(t).items()) for t in towers.values()}) == 1
    dim = models.embed_dim_of(name)
    images = torch.rand(4, 3, 32, 32)

    clip = nets["clip"].clip
    assert clip is not None and clip.visual is towers["clip"]
    assert nets["clip"].head is None and nets["clip"].projection is None
    tokens = models.tokenizer(name)(["a photo of a cat"] * 4)
    image_features = clip.encode_image(images, normalize=True)
    text_features = clip.encode_text(tokens, normalize=True)
    assert image_features.shape == text_features.shape == (4, dim)
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-5)

    simclr = nets["simclr"]
    assert simclr.projection is not None and simclr.clip is None and simclr.head is None
    assert isinstance(simclr.projection, models.ProjectionHead)
    assert simclr.projection.in_dim == dim
    assert simclr.projection(simclr.encoder(images)).shape == (4, 128)

    sup = nets["supervised"]
    assert sup.head is not None and sup.projection is None
    assert sup.head(sup.encoder(images)).shape == (4, 5)
    # Grey images of another size are made RGB and resized, as for open_clip towers.
    with torch.no_grad():
        assert sup.encoder.eval()(torch.rand(2, 1, 20, 20)).shape == (2, dim)


@pytest.mark.parametrize("name", TINY)
def test_state_dicts_round_trip_with_weights_only(name: str, tmp_path: Path) -> None:
    nets = _build_all(name)
    for method, net in nets.items():
        path = tmp_path / f"{method}.pt"
        torch.save({"model": models.plain_state_dict(net),
                    "visual": models.plain_state_dict(net.encoder.visual)}, path)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        again = models.build_pretrain_model(name, method, num_classes=5, projection_hidden=128)
        again.load_state_dict(saved["model"])
        encoder = models.encoder_from_state(name, saved["visual"])
        for k, v in net.encoder.visual.state_dict().items():
            assert torch.equal(encoder.visual.state_dict()[k], v), (method, k)
            assert torch.equal(again.encoder.visual.state_dict()[k], v), (method, k)
        if method == "clip":
            assert again.clip is not None and again.clip.visual is again.encoder.visual


def test_tiny_torchvision_config() -> None:
    name = "upstream-tiny-tvrn"
    assert name in open_clip.list_models() and name in models.known_models()
    assert models.validate_model_name(name) == name
    assert models.is_torchvision(name) and not models.is_torchvision("upstream-tiny-rn")
    assert not models.tower_is_vit(name)
    assert models.image_size_of(name) == 32 and models.embed_dim_of(name) == 64
    assert models.normalisation(name)[0] == IMAGENET_MEAN
    visual = models.build_visual(name)
    assert isinstance(visual, torchvision.models.ResNet) and visual.output_dim == 64
    assert sum(p.numel() for p in visual.parameters()) < 6_000_000
    text = models.describe_architecture(name, visual)
    assert text.startswith("torchvision ResNet(BasicBlock, [1, 1, 1, 1]) = ResNet, 4.94M params")
    assert "projection to 64-d" in text and "\n" not in text


def test_torchvision_resnet50_is_not_open_clip_rn50() -> None:
    name = "tv-resnet50"
    assert models.validate_model_name(name) == name and not models.tower_is_vit(name)
    assert models.image_size_of(name) == 224 and models.embed_dim_of(name) == 1024
    assert models.normalisation(name) == (IMAGENET_MEAN, [0.229, 0.224, 0.225])
    assert models.model_config(name)["text_cfg"] == models.model_config("RN50")["text_cfg"]
    encoder = models.build_image_encoder(name)
    visual = encoder.visual
    assert type(visual) is torchvision.models.ResNet
    # torchvision's resnet50 unchanged but for fc, which projects to embed_dim.
    reference = torchvision.models.resnet50(weights=None)
    trunk = {k: v for k, v in _shapes(visual).items() if not k.startswith("fc.")}
    assert trunk == {k: v for k, v in _shapes(reference).items() if not k.startswith("fc.")}
    assert (visual.fc.in_features, visual.fc.out_features) == (2048, 1024)
    total = sum(p.numel() for p in visual.parameters())
    projection = sum(p.numel() for p in visual.fc.parameters())
    assert 25.5e6 < total < 25.7e6 and 23.4e6 < total - projection < 23.6e6
    assert models.describe_architecture(name, visual) == (
        "torchvision resnet50 = ResNet, 25.61M params "
        "(23.51M trunk + 2.10M projection to 1024-d), as tv-resnet50"
    )
    # open_clip's RN50 is CLIP's modified ResNet, a different and bigger tower.
    assert models.describe_architecture("RN50", models.build_visual("RN50")).startswith(
        "open_clip RN50 = ModifiedResNet, 38.3"
    )
    with torch.no_grad():
        assert encoder.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 1024)


def test_torchvision_resnet50_clip_has_open_clip_rn50s_text_tower() -> None:
    net = models.build_pretrain_model("tv-resnet50", "clip")
    assert net.clip is not None and type(net.clip.visual) is torchvision.models.ResNet
    rn50 = models.build_clip("RN50")
    ours = {k: v for k, v in _shapes(net.clip).items() if not k.startswith("visual.")}
    assert ours == {k: v for k, v in _shapes(rn50).items() if not k.startswith("visual.")}


def test_unknown_names_and_methods_are_one_line_errors() -> None:
    with pytest.raises(UpstreamError, match="unknown model 'tv-resnet5'") as e:
        models.build_pretrain_model("tv-resnet5", "simclr")
    assert "\n" not in str(e.value)
    with pytest.raises(UpstreamError, match="known: clip, simclr, supervised") as e:
        models.build_pretrain_model("upstream-tiny-tvrn", "byol")
    assert "\n" not in str(e.value)
    with pytest.raises(UpstreamError, match="projection sizes"):
        models.build_pretrain_model("upstream-tiny-tvrn", "simclr", projection_out=0)
