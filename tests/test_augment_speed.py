"""SimCLR's batched views (``augment.BatchViews``) against the per-image reference.

Each op is checked against the implementation it replaces, given the same parameters (the
crop and flip against PIL's, as torchvision's transforms run them on a PIL image; the colour
ops and the blur against torchvision's tensor functions); the parameters' distributions
against the recipe's (torchvision's ``get_params`` and probabilities); then seeding, the
per-view independence, the speed against the reference and the pre-training stage using it.
"""

from __future__ import annotations

import math
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from upstream.pretrain import augment
from upstream.pretrain.augment import ViewParams

pytest_plugins = ["helpers_training"]


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random 8-bit images as floats in [0, 1] (the numbers the loader gives)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=gen).float() / 255


def _params(n: int, rows: int, cols: int, /, seed: int = 1, **fixed: Any) -> ViewParams:
    """Drawn parameters of ``n`` views of rows × cols images, some fields replaced."""
    params = augment.sample_view_params(n, rows, cols, torch.Generator().manual_seed(seed))
    return replace(params, **fixed)


def _no_colour(n: int) -> dict[str, torch.Tensor]:
    off = torch.zeros(n, dtype=torch.bool)
    return {"jitter": off, "gray": off, "blur": off}


def _geometry_of(identity: ViewParams) -> dict[str, torch.Tensor]:
    return {k: getattr(identity, k) for k in ("top", "left", "height", "width", "flip")}


# --- each op against the reference, same parameters -------------------------------------------


@pytest.mark.parametrize("size", [32, 24])
def test_identity_parameters_reproduce_the_input(size: int) -> None:
    images = _images(6, size, size)
    out = augment.apply_views(images, ViewParams.identity(6, size, size), size)
    assert torch.equal(out, images)
    grey = images[:, :1]  # a one-channel image becomes three equal channels, as convert("RGB")
    assert torch.equal(augment.apply_views(grey, ViewParams.identity(6, size, size), size),
                       grey.expand(-1, 3, -1, -1))


@pytest.mark.parametrize(("height", "width", "size"),
                         [(32, 32, 32), (48, 48, 24), (40, 48, 32), (20, 26, 32)])
def test_crop_resize_and_flip_match_pil(height: int, width: int, size: int) -> None:
    """torchvision's RandomResizedCrop + RandomHorizontalFlip on a PIL image (PIL's bilinear
    resize, antialiased when it shrinks) with the same boxes: within one 8-bit level, the
    rounding PIL does between its two passes."""
    n = 60
    images = _images(n, height, width)
    params = _params(n, height, width, **_no_colour(n))
    out = augment.apply_views(images, params, size)
    for i in range(n):
        pil = Image.fromarray((images[i] * 255).round().byte().permute(1, 2, 0).numpy())
        ref = TF.resized_crop(pil, int(params.top[i]), int(params.left[i]),
                              int(params.height[i]), int(params.width[i]), [size, size],
                              T.InterpolationMode.BILINEAR)
        if params.flip[i]:
            ref = TF.hflip(ref)
        assert (out[i] - TF.to_tensor(ref)).abs().max() <= 1 / 255 + 1e-6, i


def _reference_colour(x: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """The recipe's colour ops and blur, image by image, with torchvision's tensor functions
    in ColorJitter's own way (its ops in the drawn order)."""
    ops = {
        augment.BRIGHTNESS: lambda im, i: TF.adjust_brightness(im, float(p.brightness[i])),
        augment.CONTRAST: lambda im, i: TF.adjust_contrast(im, float(p.contrast[i])),
        augment.SATURATION: lambda im, i: TF.adjust_saturation(im, float(p.saturation[i])),
        augment.HUE: lambda im, i: TF.adjust_hue(im, float(p.hue[i])),
    }
    kernel = augment.blur_kernel_size(size)
    out = []
    for i, im in enumerate(x):
        if p.jitter[i]:
            for op in p.order[i].tolist():
                im = ops[op](im, i)
        if p.gray[i]:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if p.blur[i]:
            im = TF.gaussian_blur(im, [kernel, kernel], [float(p.sigma[i])] * 2)
        out.append(im)
    return torch.stack(out)


@pytest.mark.parametrize("size", [32, 64])
def test_colour_jitter_grayscale_and_blur_match_torchvision(size: int) -> None:
    n = 300
    images = _images(n, size, size)
    params = _params(n, size, size, **_geometry_of(ViewParams.identity(n, size, size)))
    out = augment.apply_views(images, params, size)
    torch.testing.assert_close(out, _reference_colour(images, params, size), atol=1e-5, rtol=0)
    # Each op ran on some views in each of the four positions.
    for position in range(4):
        assert set(params.order[params.jitter, position].tolist()) == {0, 1, 2, 3}


def test_blur_is_a_no_op_below_20_px() -> None:
    images = _images(8, 16, 16)
    n = len(images)
    on = torch.ones(n, dtype=torch.bool)
    params = _params(n, 16, 16, **(_geometry_of(ViewParams.identity(n, 16, 16))
                                   | _no_colour(n) | {"blur": on}))
    assert augment.blur_kernel_size(16) == 1
    assert torch.equal(augment.apply_views(images, params, 16), images)


def test_whole_recipe_matches_the_reference_ops_given_the_parameters() -> None:
    """The batched pipeline = PIL's crop and flip, then torchvision's colour ops and blur, image
    by image, with the same parameters (the colour part fed the batched crop, so that PIL's
    8-bit rounding of the crop does not count twice)."""
    n, size = 128, 32
    images = _images(n, 40, 36)
    params = _params(n, 40, 36, seed=7)
    out = augment.apply_views(images, params, size)
    cropped = augment.apply_views(images, replace(params, **_no_colour(n)), size)
    geometry_free = replace(params, **_geometry_of(ViewParams.identity(n, size, size)))
    torch.testing.assert_close(out, _reference_colour(cropped, geometry_free, size),
                               atol=1e-5, rtol=0)


def test_whole_recipe_against_pil_image_by_image() -> None:
    """Against the recipe as torchvision runs it on a PIL image, same parameters: PIL rounds to
    8 bits after every op and takes hue through 8-bit HSV, so views differ by about a level
    out of 255 on average, a few at the 99th percentile; without colour jitter, ≤ 1.5."""
    n, size = 200, 32
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (n, 3, 40, 36), generator=gen, dtype=torch.uint8)
    p = _params(n, 40, 36, seed=4)
    out = augment.apply_views(raw.float() / 255, p, size)
    ops = {
        augment.BRIGHTNESS: lambda im, i: TF.adjust_brightness(im, float(p.brightness[i])),
        augment.CONTRAST: lambda im, i: TF.adjust_contrast(im, float(p.contrast[i])),
        augment.SATURATION: lambda im, i: TF.adjust_saturation(im, float(p.saturation[i])),
        augment.HUE: lambda im, i: TF.adjust_hue(im, float(p.hue[i])),
    }
    ref = []
    for i in range(n):
        im = Image.fromarray(raw[i].permute(1, 2, 0).numpy())
        im = TF.resized_crop(im, int(p.top[i]), int(p.left[i]), int(p.height[i]),
                             int(p.width[i]), [size, size], T.InterpolationMode.BILINEAR)
        if p.jitter[i]:
            for op in p.order[i].tolist():
                im = ops[op](im, i)
        if p.gray[i]:
            im = TF.rgb_to_grayscale(im, num_output_channels=3)
        if p.blur[i]:
            im = TF.gaussian_blur(im, [3, 3], [float(p.sigma[i])] * 2)
        if p.flip[i]:
            im = TF.hflip(im)
        ref.append(TF.to_tensor(im))
    levels = (out - torch.stack(ref)).abs() * 255
    assert levels.mean() < 2 and levels.flatten().quantile(0.99) < 8
    assert levels[~p.jitter].max() <= 1.5


# --- the parameters' distributions -------------------------------------------------------------


def _quantiles(x: torch.Tensor) -> torch.Tensor:
    return torch.quantile(x.double(), torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9],
                                                   dtype=torch.float64))


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40)])
def test_crop_boxes_follow_random_resized_crop(height: int, width: int) -> None:
    n = 6000
    p = augment.sample_view_params(n, height, width, torch.Generator().manual_seed(3))
    assert (p.top >= 0).all() and (p.left >= 0).all()
    assert (p.top + p.height <= height).all() and (p.left + p.width <= width).all()
    assert (p.height > 0).all() and (p.width > 0).all()
    # Within the recipe's bounds up to torchvision's rounding of the sides to whole pixels.
    area = height * width
    lo, hi = augment.CROP_SCALE
    assert ((p.width + 0.5) * (p.height + 0.5) >= lo * area).all()
    assert ((p.width - 0.5) * (p.height - 0.5) <= hi * area).all()
    ratio = p.width / p.height
    assert (((p.width + 0.5) / (p.height - 0.5).clamp(min=0.5)) >= 3 / 4).all()
    assert (((p.width - 0.5) / (p.height + 0.5)) <= 4 / 3).all()
    # The same distribution as torchvision's get_params (quantiles of scale, aspect, place).
    torch.manual_seed(3)
    image = torch.zeros(3, height, width)
    ref = torch.tensor([T.RandomResizedCrop.get_params(image, [lo, hi], [3 / 4, 4 / 3])
                        for _ in range(n)], dtype=torch.float64)
    ours = {"scale": p.width * p.height / area, "log_ratio": ratio.log(),
            "centre_y": (p.top + p.height / 2) / height,
            "centre_x": (p.left + p.width / 2) / width}
    theirs = {"scale": ref[:, 2] * ref[:, 3] / area, "log_ratio": (ref[:, 3] / ref[:, 2]).log(),
              "centre_y": (ref[:, 0] + ref[:, 2] / 2) / height,
              "centre_x": (ref[:, 1] + ref[:, 3] / 2) / width}
    for key, tol in (("scale", 0.03), ("log_ratio", 0.04), ("centre_y", 0.03),
                     ("centre_x", 0.03)):
        assert (_quantiles(ours[key]) - _quantiles(theirs[key])).abs().max() < tol, key


def test_crop_falls_back_to_torchvisions_central_crop() -> None:
    """No box of the allowed scale and aspect fits a 4 × 200 image: the central crop."""
    p = augment.sample_view_params(50, 4, 200, torch.Generator().manual_seed(0))
    ref = T.RandomResizedCrop.get_params(torch.zeros(3, 4, 200), [0.08, 1.0], [3 / 4, 4 / 3])
    assert ref == (0, 97, 4, 5)
    for name, value in zip(("top", "left", "height", "width"), ref, strict=True):
        assert (getattr(p, name) == value).all(), name


def test_each_view_draws_its_own_parameters_with_the_recipes_probabilities() -> None:
    n = 40_000
    p = augment.sample_view_params(n, 32, 32, torch.Generator().manual_seed(5))
    for name, expected in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("flip", 0.5)):
        share = getattr(p, name).double().mean().item()
        assert abs(share - expected) < 0.01, (name, share)
    # ColorJitter's random order: every op equally likely at every position, and a
    # permutation in every view.
    assert torch.equal(p.order.sort(dim=1).values, torch.arange(4).expand(n, 4))
    for position in range(4):
        counts = torch.bincount(p.order[:, position], minlength=4).double() / n
        assert (counts - 0.25).abs().max() < 0.01
    assert len({tuple(row) for row in p.order.tolist()}) == 24
    b, c, s, h = augment.JITTER
    for name, (lo, hi) in (("brightness", (1 - b, 1 + b)), ("contrast", (1 - c, 1 + c)),
                           ("saturation", (1 - s, 1 + s)), ("hue", (-h, h)),
                           ("sigma", augment.BLUR_SIGMA)):
        x = getattr(p, name)
        assert lo <= x.min() and x.max() <= hi, name
        assert abs(x.mean().item() - (lo + hi) / 2) < 0.01 * (hi - lo), name
        assert x.unique().numel() > n // 2, name  # not one value for the whole batch
    # Independent draws: the coins do not move together.
    assert abs((p.gray & p.blur).double().mean().item() - 0.1) < 0.01


def test_grayscale_share_in_the_views_themselves() -> None:
    """Over many views of colour images, about a fifth come out grey (R = G = B): the coin
    as applied, not only as drawn."""
    views = augment.simclr_batch_views(16)(_images(2000, 16, 16), seed=2)
    grey = (views[:, :, 0] == views[:, :, 1]).flatten(2).all(-1) & (
        views[:, :, 1] == views[:, :, 2]).flatten(2).all(-1)
    assert abs(grey.double().mean().item() - 0.2) < 0.015


# --- the batch as pre-training gets it ---------------------------------------------------------


def test_views_of_a_batch_shape_range_seed_and_independence() -> None:
    views = augment.simclr_batch_views(32)
    images = _images(1, 40, 48).expand(16, -1, -1, -1)  # one image sixteen times
    out = views(images, seed=11)
    assert out.shape == (16, 2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    flat = out.flatten(0, 1).flatten(1)
    # Every view of the same image differs from every other: no batch-wide parameter.
    assert torch.cdist(flat, flat).add(torch.eye(32) * 1e9).min() > 0
    assert torch.equal(views(images, seed=11), out)
    assert not torch.equal(views(images, seed=12), out)
    assert torch.equal(views(images, generator=torch.Generator().manual_seed(11)), out)
    # The global RNG is neither used nor moved.
    state = torch.get_rng_state()
    views(images, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    # Rows 2i and 2i + 1 of the parameters are image i's two views.
    params = views.sample(16, 40, 48, torch.Generator().manual_seed(11))
    again = augment.apply_views(images[:, None].expand(16, 2, 3, 40, 48).reshape(32, 3, 40, 48),
                                params, 32).view(16, 2, 3, 32, 32)
    assert torch.equal(again, out)


def test_view_seeds_depend_on_every_part() -> None:
    base = augment.view_seed(0, 0, 0, 0)
    assert base == augment.view_seed(0, 0, 0, 0)
    others = {augment.view_seed(*parts) for parts in
              ((1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1))}
    assert base not in others and len(others) == 4
    assert all(0 <= s < 2**63 for s in others)


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        augment.simclr_batch_views(32)(torch.rand(2, 2, 3, 32, 32), seed=0)
    with pytest.raises(ValueError, match="parameters for"):
        augment.apply_views(torch.rand(3, 3, 8, 8), ViewParams.identity(2, 8, 8), 8)
    with pytest.raises(ValueError, match="float images"):
        augment.apply_views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8),
                            ViewParams.identity(2, 8, 8), 8)
    with pytest.raises(Exception, match="image_size"):
        augment.simclr_batch_views(0)


def test_batched_views_are_much_faster_than_the_per_image_reference() -> None:
    """64 32-px images, two views each: ~70 ms in the reference, ~6-10 ms batched (one
    quiet core); asked here: 3× (the machine may be shared)."""
    images = _images(64, 32, 32)
    pils = [Image.fromarray((im * 255).round().byte().permute(1, 2, 0).numpy()) for im in images]
    batched, reference = augment.simclr_batch_views(32), augment.simclr_views(32)
    fast, slow = [], []
    for r in range(5):  # interleaved, best of each: the least disturbed runs
        t = time.perf_counter()
        batched(images, seed=r)
        fast.append(time.perf_counter() - t)
        t = time.perf_counter()
        for pil in pils:
            reference(pil)
        slow.append(time.perf_counter() - t)
    assert min(slow) / min(fast) > 3, (min(slow), min(fast))


def test_params_fields_are_one_row_per_view() -> None:
    p = augment.sample_view_params(10, 32, 32, torch.Generator().manual_seed(0))
    assert len(p) == 10 and all(len(getattr(p, f.name)) == 10 for f in fields(p))
    assert math.isclose(float(ViewParams.identity(4, 8, 8).hue.abs().sum()), 0.0)


# --- the pre-training stage --------------------------------------------------------------------


def test_stage_makes_simclr_views_on_the_batch_for_one_size_shards() -> None:
    from upstream.pretrain import stage

    config = stage.PretrainConfig.parse(data="x", method="simclr")
    square = {"resize": "square"}
    assert stage._transform(config, 32, square) is None
    assert isinstance(stage._batch_views(config, 32, square), augment.BatchViews)
    # Images of several sizes cannot make one batch tensor: the per-image views, in the loader.
    for manifest in ({"resize": "keep"}, {"resize": "max_side"}, {}):
        assert isinstance(stage._transform(config, 32, manifest), augment.SimCLRViews)
        assert stage._batch_views(config, 32, manifest) is None
    for method in ("clip", "supervised"):
        other = stage.PretrainConfig.parse(data="x", method=method)
        assert stage._batch_views(other, 32, square) is None


@pytest.mark.usefixtures("training_env")
def test_simclr_pretraining_with_batched_views_resumes_to_the_same_weights(
    shapes_train: str, tmp_path: Path
) -> None:
    """The views are seeded by the batch: a run resumed from its state at step 3 ends with the
    weights of the uninterrupted run; another seed gives other weights."""
    from upstream import models, storage
    from upstream.pretrain import PretrainConfig, pretrain

    def run(out: Path, **kw: Any) -> dict[str, Any]:
        values = {"data": shapes_train, "output": str(out), "method": "simclr", "epochs": 2,
                  "batch_size": 16, "warmup_steps": 2, "projection_hidden": 64,
                  "projection_dim": 32, "experiment": "upstream-tests"} | kw
        return pretrain(PretrainConfig.parse(**values))

    first = run(tmp_path / "a", checkpoint_every=3)  # 8 steps
    assert first["steps"] == 8 and math.isfinite(first["final_loss"])
    storage.remove_file(first["checkpoint"])
    again = run(tmp_path / "a", checkpoint_every=3)
    assert again["resumed"].endswith("step-00000006.pt")
    other = run(tmp_path / "b", seed=1)
    a, b, c = (models.load_checkpoint(r["checkpoint"])["visual"] for r in (first, again, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
