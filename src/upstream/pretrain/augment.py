"""Training-time image transforms of the three pre-training methods.

Each is a small class (not a lambda or closure) so that DataLoader workers started with
``spawn`` can pickle it, maps a PIL image to float tensors in [0, 1] and leaves resizing to the
model's input size and mean/std normalisation to :class:`upstream.models.ImageEncoder`. All
randomness comes from torchvision's transforms, which draw from torch's global RNG: seeding
torch (as DataLoader does per worker) makes them reproducible.

- ``simclr``: two independent views per image, SimCLR's recipe as SLIP uses it (crop to
  8–100 % of the area, strong colour jitter, grayscale, blur, flip). The method learns
  invariance to exactly these, so they are the method, not tuning.
- ``clip``: open_clip's training default, a mild random crop (90–100 % of the area, bicubic,
  no flip): the papers follow Radford et al., whose only augmentation is a random square
  crop, and captions may describe left and right.
- ``supervised``: the standard ImageNet recipe (torchvision's classification reference):
  Inception-style crop (8–100 %) and horizontal flip.
"""

from __future__ import annotations

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
