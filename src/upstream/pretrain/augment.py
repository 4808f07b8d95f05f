"""Training-time image transforms of the three pre-training methods.

Each is a small class (not a lambda or closure) so that DataLoader workers started with
``spawn`` can pickle it, maps a PIL image to float tensors in [0, 1] and leaves resizing to the
model's input size and mean/std normalisation to :class:`upstream.models.ImageEncoder`. All
randomness comes from torchvision's transforms, which draw from torch's global RNG: seeding
torch (as DataLoader does per worker) makes them reproducible.

- ``simclr``: two independent views per image, SimCLR's recipe as SLIP uses it (crop to
  8–100 % of the area, strong colour jitter, grayscale, blur, flip). The method learns
  invariance to exactly these, so they are the method, not tuning. Two implementations:
  :class:`SimCLRViews`, torchvision's transforms on one PIL image at a time (the reference),
  and :class:`BatchViews`, the same recipe on a whole batch tensor with every view's own
  random parameters (what pre-training uses; see "Batched SimCLR views" below).
- ``clip``: open_clip's training default, a mild random crop (90–100 % of the area, bicubic,
  no flip): the papers follow Radford et al., whose only augmentation is a random square
  crop, and captions may describe left and right.
- ``supervised``: the standard ImageNet recipe (torchvision's classification reference):
  Inception-style crop (8–100 %) and horizontal flip.

Batched SimCLR views
--------------------
Where the time went (``upstream-tiny-rn``, 32 px, batch 64, 2 shared cores, torch's 2
threads): the per-image reference costs ~1.1 ms of CPU per image for its two views (~70 ms a
batch), against ~12 µs to decode the image; per view, colour jitter ~160 µs when applied
(four PIL enhancers and an HSV round trip), Gaussian blur ~260 µs when applied (PIL → tensor →
conv → PIL for a 32-px image), the crop ~40 µs, ToTensor ~18 µs. The model's step on the 2 ×
64 views is ~180-200 ms (forward ~35, backward ~80, AdamW ~65), most of it the 4096-wide
projection head (forward + backward ~64-69 ms, its AdamW ~48-56 ms), against ~48 ms for
CLIP's whole step: with these views SimCLR's step runs at ~0.3 of CLIP's, limited by that
compute (README, "Benchmarks").

:class:`BatchViews` draws every view's parameters from a seeded ``torch.Generator`` (on the
CPU, so the same seed gives the same views on any device) and applies them to the batch in a
few tensor operations, on whatever device the batch is on (~6-10 ms for the 2 × 64 views
here, 7x less CPU than the reference; the colour jitter is most of it):

- RandomResizedCrop(scale 0.08–1, ratio 3/4–4/3) + flip: torchvision's ``get_params``
  vectorised (10 draws per view, the first that fits, else its central-crop fallback; integer
  boxes as it rounds them). Crop and resize are one separable linear map per view, two
  matrices built with PIL's own bilinear coefficients (its triangle filter, widened when the
  crop is larger than the output, i.e. PIL's antialiasing, with taps outside the box dropped
  and the rest renormalised), applied as ``rows @ image @ cols^T``; the flip reverses the
  column matrix. It is folded into the crop although the recipe flips last: every op between
  (per-pixel colour ops, a symmetric kernel with reflect padding) commutes with it.
- ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8: factors uniform in [0.6, 1.4] and a hue shift
  in [-0.1, 0.1] per view, and like torchvision a random order of the four per view (a
  permutation each; at each of the four positions every op is run on the views that have it
  there). The ops are torchvision's tensor versions (``F.adjust_*`` on float images: blends
  clamped to [0, 1], contrast against the mean of the image's luma, hue through HSV).
- Grayscale with p = 0.2: ITU-R 601 luma in all three channels, by a per-view mask.
- GaussianBlur(kernel :func:`blur_kernel_size`, σ uniform in [0.1, 2]) with p = 0.5: per-view
  1-D kernels, reflect padding, as one matrix per axis (the same sums as torchvision's conv).

Deviations from the reference (tested in ``tests/test_augment_speed.py``): images stay float
throughout, where PIL rounds to 8 bits after every op; contrast uses the float mean of luma
(PIL: the mean of its 8-bit luma, rounded) and hue the float HSV round trip (PIL: 8-bit HSV,
the hue in 256 steps round the circle). Given the same parameters, views differ from PIL's by
1.2 levels out of 255 on average, 4.6 at the 99th percentile, 19 at the worst pixel (hue); by
at most 1.5 without colour jitter (the crop alone: at most 1, PIL's rounding between its two
resize passes). Against torchvision's tensor ops (``F.adjust_*``, ``F.gaussian_blur``) the
colour part agrees to 1e-5. The parameters come in another order from another generator, so a
seed gives other views than the reference with the same seed, from the same distributions.
The op order and the probabilities are the recipe's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T

from upstream.errors import UpstreamError


def _check_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise UpstreamError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's Gaussian blur kernel: 10 % of the image side, made odd (1, a no-op, below
    20 px, where the paper's CIFAR runs drop the blur anyway)."""
    return (image_size // 10) | 1


class _Transform:
    """A torchvision pipeline applied to an RGB version of the image."""

    def __init__(self, pipeline: T.Compose):
        self.pipeline = pipeline

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image.convert("RGB"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pipeline!r})"


class SimCLRViews(_Transform):
    """Two independent SimCLR views of one image, stacked: (2, 3, S, S) in [0, 1]."""

    def __init__(self, image_size: int):
        size = _check_size(image_size)
        super().__init__(
            T.Compose(
                [
                    T.RandomResizedCrop(size, scale=(0.08, 1.0)),
                    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
                    T.RandomGrayscale(p=0.2),
                    T.RandomApply(
                        [T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5
                    ),
                    T.RandomHorizontalFlip(),
                    T.ToTensor(),
                ]
            )
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        rgb = image.convert("RGB")
        return torch.stack([self.pipeline(rgb), self.pipeline(rgb)])


def simclr_views(image_size: int) -> SimCLRViews:
    """SimCLR's augmentation: PIL image → (2, 3, image_size, image_size) float in [0, 1]."""
    return SimCLRViews(image_size)


def clip_train(image_size: int) -> _Transform:
    """open_clip's training crop: PIL image → (3, image_size, image_size) float in [0, 1]."""
    size = _check_size(image_size)
    return _Transform(
        T.Compose(
            [
                T.RandomResizedCrop(
                    size, scale=(0.9, 1.0), interpolation=T.InterpolationMode.BICUBIC
                ),
                T.ToTensor(),
            ]
        )
    )


def supervised_train(image_size: int) -> _Transform:
    """The ImageNet training crop and flip: PIL image → (3, image_size, image_size) in [0, 1]."""
    size = _check_size(image_size)
    return _Transform(
        T.Compose(
            [
                T.RandomResizedCrop(size, scale=(0.08, 1.0)),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
            ]
        )
    )


# --- SimCLR's views on a batch ------------------------------------------------------------------

#: The recipe's parameters (SLIP's, via torchvision's defaults for the crop's aspect ratio).
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
BLUR_SIGMA = (0.1, 2.0)
#: ColorJitter's ops, as its ``fn_idx`` numbers them.
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


@dataclass(frozen=True)
class ViewParams:
    """Every view's random parameters, one row per view (CPU tensors of length N).

    The crop box (``top``, ``left``, ``height``, ``width``, in pixels of the input image),
    ``flip``; ``jitter`` (applied or not), ``order`` (N, 4: the jitter's ops in the order
    they run, a permutation of :data:`BRIGHTNESS` … :data:`HUE`) and its ``brightness``,
    ``contrast``, ``saturation`` factors and ``hue`` shift; ``gray``; ``blur`` and ``sigma``.
    """

    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    order: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def identity(cls, n: int, height: int, width: int) -> ViewParams:
        """Parameters that change nothing: the whole image, no flip, no colour op, no blur."""
        zeros, ones = torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.float64)
        off = torch.zeros(n, dtype=torch.bool)
        return cls(top=zeros, left=zeros, height=zeros + height, width=zeros + width,
                   flip=off, jitter=off, order=torch.arange(4).repeat(n, 1),
                   brightness=ones, contrast=ones, saturation=ones, hue=ones * 0, gray=off,
                   blur=off, sigma=ones)

    def __len__(self) -> int:
        return len(self.top)


def sample_view_params(n: int, height: int, width: int, generator: torch.Generator) -> ViewParams:
    """Draw ``n`` views' parameters for ``height`` × ``width`` images, each view its own,
    with the recipe's distributions (torchvision's ``get_params`` of each transform)."""

    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape or (n,), generator=generator,
                                               dtype=torch.float64)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, dtype=torch.float64) < p

    # RandomResizedCrop.get_params: up to 10 tries, the first box that fits, else the fallback.
    area = height * width
    target = area * uniform(*CROP_SCALE, n, 10)
    aspect = torch.exp(uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), n, 10))
    w = torch.round(torch.sqrt(target * aspect)).long()  # round half to even, as round() does
    h = torch.round(torch.sqrt(target / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first True (ties: the first index)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    found = fits.any(dim=1)
    in_ratio = width / height
    if in_ratio < min(CROP_RATIO):
        fw, fh = width, int(round(width / min(CROP_RATIO)))
    elif in_ratio > max(CROP_RATIO):
        fw, fh = int(round(height * max(CROP_RATIO))), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    # randint(0, size - h + 1): uniform over the box's possible positions.
    pos = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (pos[:, 0] * (height - h + 1)).long().clamp_max(height - h),
                      (height - h) // 2)
    left = torch.where(found, (pos[:, 1] * (width - w + 1)).long().clamp_max(width - w),
                       (width - w) // 2)
    flip = coin(P_FLIP)
    b, c, s, hue = JITTER
    jitter = coin(P_JITTER)
    order = torch.rand(n, 4, generator=generator).argsort(dim=1)  # a uniform permutation
    brightness, contrast = uniform(1 - b, 1 + b), uniform(1 - c, 1 + c)
    saturation, shift = uniform(1 - s, 1 + s), uniform(-hue, hue)
    gray = coin(P_GRAY)
    blur = coin(P_BLUR)
    sigma = uniform(*BLUR_SIGMA)
    return ViewParams(top=top, left=left, height=h, width=w, flip=flip, jitter=jitter,
                      order=order, brightness=brightness, contrast=contrast,
                      saturation=saturation, hue=shift, gray=gray, blur=blur, sigma=sigma)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, out_size, in_size): row ``o`` of view ``n`` holds the weights with which PIL's
    BILINEAR resize of the span ``[start, start + length)`` to ``out_size`` pixels makes
    output pixel ``o`` (``Image.crop`` then ``Image.resize``, as torchvision's
    ``resized_crop`` does on a PIL image), in ``dtype``."""
    scale = length.to(dtype) / out_size  # input pixels per output pixel
    support = scale.clamp(min=1.0)  # PIL widens the triangle when it shrinks (antialiasing)
    center = (torch.arange(out_size, dtype=dtype) + 0.5)[None, :] * scale[:, None]
    x = torch.arange(in_size, dtype=dtype)[None, None, :] - start.to(dtype)[:, None, None]
    weight = (x + 0.5 - center[:, :, None]).div_(support[:, None, None]).abs_()
    weight = weight.neg_().add_(1.0).clamp_(min=0.0)
    weight.masked_fill_((x < 0) | (x >= length.to(dtype)[:, None, None]), 0.0)
    return weight.div_(weight.sum(dim=-1, keepdim=True))


def blur_matrix(sigma: torch.Tensor, kernel_size: int, size: int) -> torch.Tensor:
    """(N, size, size): torchvision's Gaussian blur along one axis of ``size`` pixels (its 1-D
    kernel of ``kernel_size`` taps for each σ, reflect padding) as a matrix. Float64."""
    f64 = torch.float64
    half = kernel_size // 2
    taps = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, dtype=f64)
    kernel = torch.exp(-0.5 * (taps[None, :] / sigma.to(f64)[:, None]) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (N, k)
    out = torch.arange(size)[:, None]
    src = out + torch.arange(-half, half + 1)[None, :]  # (size, k), then reflected inwards
    src = torch.where(src < 0, -src, src)
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)
    matrix = torch.zeros(len(sigma), size, size, dtype=f64)
    index = src[None].expand(len(sigma), size, kernel_size)
    return matrix.scatter_add_(2, index, kernel[:, None, :].expand(-1, size, -1).contiguous())


def _luma(x: torch.Tensor) -> torch.Tensor:
    """torchvision's ``rgb_to_grayscale``: (N, 3, H, W) → (N, 1, H, W)."""
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` on float images, one factor per image."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1.0 - f) * other).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """torchvision's ``adjust_hue`` on float RGB images, one shift per image: the hue (RGB →
    HSV) moved round the circle, saturation and value kept, back to RGB. The same sums in
    fewer tensor ops: hue in sextants from the largest channel, and HSV → RGB as
    ``v - c · clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + 6h) mod 6``, n = 5, 3, 1 for R, G,
    B (c = max - min = v · s, the chroma)."""
    r, g, b = x.unbind(dim=1)
    v, low = x.amax(dim=1), x.amin(dim=1)
    c = v - low
    safe = torch.where(c == 0, 1.0, c)  # grey pixels: no hue; any value gives them back
    h6 = torch.where(v == r, (g - b) / safe,
                     torch.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h6 = (h6 + 6.0 * shift.view(-1, 1, 1)).unsqueeze(1)  # (N, 1, H, W), sextants
    n = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + h6, 6.0)
    return v.unsqueeze(1) - c.unsqueeze(1) * torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)


def _jitter_op(op: int, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """ColorJitter's op ``op`` on images ``x``, one factor (hue: shift) per image."""
    if op == BRIGHTNESS:
        return _blend(x, 0.0, factor)
    if op == CONTRAST:
        return _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == SATURATION:
        return _blend(x, _luma(x), factor)
    return _adjust_hue(x, factor)


def apply_views(images: torch.Tensor, params: ViewParams, size: int) -> torch.Tensor:
    """SimCLR's recipe on ``images`` (N, C, H, W) floats in [0, 1] (C = 1 or 3), view ``n``
    with ``params`` row ``n``: (N, 3, size, size), on the images' device."""
    n, _, height, width = images.shape
    if len(params) != n:
        raise ValueError(f"{len(params)} views' parameters for {n} images")
    if not images.is_floating_point():
        raise ValueError(f"apply_views takes float images in [0, 1], got {images.dtype}")
    device, dtype = images.device, images.dtype
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    # Crop, resize and flip: one separable linear map per view.
    rows = resample_matrix(params.top, params.height, height, size, dtype)
    cols = resample_matrix(params.left, params.width, width, size, dtype)
    flip = params.flip.nonzero().squeeze(1)
    cols[flip] = cols[flip].flip(1)
    rows, cols = rows.to(device), cols.to(device)
    x = rows[:, None] @ images @ cols[:, None].transpose(-1, -2)  # a new tensor: ours to edit
    # Every later op runs on the views that have it (their rows gathered, written back).

    def update(mask: torch.Tensor, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
               ) -> None:
        """``fn(their images, their row numbers)`` for the views in ``mask``."""
        chosen = mask.nonzero().squeeze(1)
        if len(chosen):
            on = chosen.to(device)
            x.index_copy_(0, on, fn(x.index_select(0, on), chosen))

    # Colour jitter, in each view's own order of its four ops.
    factors = torch.stack([params.brightness, params.contrast, params.saturation, params.hue])
    factors = factors.to(dtype)  # (4, N), in ColorJitter's op numbering
    for position in range(4):
        for op in range(4):
            update(params.jitter & (params.order[:, position] == op),
                   lambda v, rows, op=op: _jitter_op(op, v, factors[op, rows].to(device)))
    update(params.gray, lambda v, rows: _luma(v).expand(-1, 3, -1, -1))
    kernel = blur_kernel_size(size)
    if kernel > 1:

        def blur(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            m = blur_matrix(params.sigma[rows], kernel, size).to(device, dtype)[:, None]
            return m @ v @ m.transpose(-1, -2)

        update(params.blur, blur)
    return x


class BatchViews:
    """Two SimCLR views of every image of a batch, each with its own random parameters:
    (B, C, H, W) floats in [0, 1] → (B, 2, 3, S, S), the pairs as :class:`SimCLRViews` stacks
    them. Works on any device; the parameters are drawn on the CPU (see the module's notes)."""

    def __init__(self, image_size: int):
        self.size = _check_size(image_size)

    def sample(self, batch: int, height: int, width: int,
               generator: torch.Generator) -> ViewParams:
        """The parameters of the 2 × ``batch`` views; row 2i + v is view v of image i."""
        return sample_view_params(2 * batch, height, width, generator)

    def __call__(self, images: torch.Tensor, seed: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        if images.dim() != 4:
            raise ValueError(f"BatchViews takes (B, C, H, W) images, got {tuple(images.shape)}")
        if generator is None:
            generator = torch.Generator()
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed % 2**63)
        b, c, h, w = images.shape
        params = self.sample(b, h, w, generator)
        pairs = images[:, None].expand(b, 2, c, h, w).reshape(2 * b, c, h, w)
        return apply_views(pairs, params, self.size).view(b, 2, 3, self.size, self.size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.size})"


def simclr_batch_views(image_size: int) -> BatchViews:
    """SimCLR's augmentation on a batch: (B, C, H, W) in [0, 1] → (B, 2, 3, S, S)."""
    return BatchViews(image_size)


def view_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The seed of one batch's views: from the run's seed and where the batch is (epoch,
    batch within it, rank), so a resumed run makes the views an uninterrupted one makes."""
    return hash((seed, epoch, batch, rank, 4)) % 2**63
