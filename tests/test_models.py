"""Model building, normalisation, checkpoint files and the shared training pieces."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from upstream import models, training
from upstream.errors import UpstreamError

TINY = ["upstream-tiny-rn", "upstream-tiny-vit"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_build_the_same_tower_for_both_methods(name: str) -> None:
    clip = models.build_pretrain_model(name, "clip")
    sup = models.build_pretrain_model(name, "supervised", num_classes=7)
    assert clip.clip is not None and clip.head is None
    assert sup.head is not None and sup.clip is None and sup.head.out_features == 7
    # The clip encoder's tower is the CLIP model's own, not a copy.
    assert clip.encoder.visual is clip.clip.visual
    assert type(clip.encoder.visual) is type(sup.encoder.visual)
    shapes = {k: v.shape for k, v in clip.encoder.visual.state_dict().items()}
    assert shapes == {k: v.shape for k, v in sup.encoder.visual.state_dict().items()}
    # And it loads into the bare tower fine-tuning builds.
    models.encoder_from_state(name, sup.encoder.visual.state_dict())
    expected = "ModifiedResNet" if name.endswith("rn") else "VisionTransformer"
    assert expected in models.describe_architecture(name, sup.encoder.visual)
    # Grey 20 px images are accepted: made RGB and resized to the tower's 32 px.
    with torch.no_grad():
        out = sup.encoder.eval()(torch.rand(2, 1, 20, 20))
    assert out.shape == (2, models.embed_dim_of(name))


def test_encoder_normalises_unit_images_itself() -> None:
    torch.manual_seed(0)
    enc = models.build_image_encoder("upstream-tiny-vit").eval()
    mean, std = models.normalisation("upstream-tiny-vit")
    x = torch.rand(3, 3, 32, 32)
    manual = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(enc(x), enc.visual(manual), atol=1e-5)
        assert not torch.allclose(enc(x), enc.visual(x), atol=1e-3)


@pytest.mark.parametrize("name", ["no-such-model", "hf-hub:someone/model", ""])
def test_unknown_model_name_is_one_line_error(name: str) -> None:
    with pytest.raises(UpstreamError) as e:
        models.validate_model_name(name)
    assert "unknown model" in str(e.value) and "upstream-tiny-rn" in str(e.value)
    assert "\n" not in str(e.value)


def test_known_names_validate() -> None:
    for name in [*TINY, "RN50", "ViT-B-32"]:
        assert models.validate_model_name(name) == name
    assert models.tower_is_vit("ViT-B-32") and not models.tower_is_vit("RN50")
    assert models.image_size_of("upstream-tiny-rn") == 32


def test_unknown_method_refused() -> None:
    with pytest.raises(UpstreamError, match="known: clip, simclr, supervised"):
        models.build_pretrain_model("upstream-tiny-rn", "byol")
    with pytest.raises(UpstreamError, match="2 classes"):
        models.build_pretrain_model("upstream-tiny-rn", "supervised", num_classes=1)


def test_file_round_trip_with_weights_only(tmp_path: Path) -> None:
    obj = {"format": models.CHECKPOINT_FORMAT, "w": torch.arange(3.0), "names": ["a", "b"],
           "config": {"lr": 0.1, "nested": [1, 2]}}
    models.save_file(obj, str(tmp_path / "run" / "checkpoint.pt"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt"]
    raw = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert raw["names"] == ["a", "b"] and torch.equal(raw["w"], torch.arange(3.0))
    # The folder or the file itself both name it.
    assert models.load_checkpoint(str(tmp_path / "run"))["config"]["nested"] == [1, 2]
    assert models.load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["names"] == ["a", "b"]


def test_bad_files_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UpstreamError, match="does not exist"):
        models.load_checkpoint(str(tmp_path / "nothing"))
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(UpstreamError, match="not an upstream-checkpoint"):
        models.load_checkpoint(str(tmp_path / "other.pt"))
    (tmp_path / "text.pt").write_text("not a torch file")
    with pytest.raises(UpstreamError, match="not a readable torch file") as e:
        models.load_model_file(str(tmp_path / "text.pt"))
    assert "\n" not in str(e.value)


def test_warmup_then_cosine_to_zero() -> None:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = training.warmup_cosine(opt, warmup_steps=4, total_steps=20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == sorted(lrs[:5]) and lrs[0] < 0.5 and lrs[4] == pytest.approx(1.0)
    assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.05


def test_optimizer_decays_weights_only() -> None:
    net = models.build_pretrain_model("upstream-tiny-rn", "clip")
    opt = training.make_optimizer(net, lr=1e-3, weight_decay=0.2)
    no_decay, decay = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0 and opt.param_groups[1]["weight_decay"] == 0.2
    assert net.clip is not None
    assert id(net.clip.logit_scale) in no_decay
    visual = net.encoder.visual
    assert id(visual.conv1.weight) in decay
    assert id(visual.bn1.weight) in no_decay and id(visual.attnpool.c_proj.bias) in no_decay
    assert len(no_decay) + len(decay) == len(list(net.parameters()))


def test_cached_tokenizer_gives_open_clips_rows() -> None:
    import open_clip

    raw = open_clip.get_tokenizer("upstream-tiny-rn")
    cached = models.tokenizer("upstream-tiny-rn")
    captions = ["a photo of a dog.", "x", "a photo of a dog.", "long " * 100, ""]
    assert torch.equal(cached(captions), raw(captions))
    assert len(cached.cache) == 4
    assert torch.equal(cached(captions[::-1]), raw(captions[::-1]))  # from the cache
    small = models.CachedTokenizer(raw, size=2)
    assert torch.equal(small(captions), raw(captions)) and len(small.cache) <= 4
