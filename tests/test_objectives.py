"""Pre-training objectives (NT-Xent, CLIP loss, projection head) and their augmentations.

The distributed test runs a real 2-process gloo group with DDP and checks that splitting a batch
across ranks changes neither the loss nor the gradients.
"""

from __future__ import annotations

import math
import os
import pickle
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from upstream.errors import UpstreamError
from upstream.models import ProjectionHead
from upstream.pretrain import augment
from upstream.pretrain.objectives import NTXentLoss, clip_loss, gather_with_grad

# --- NT-Xent against the textbook formula -----------------------------------------------------


def reference_ntxent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> float:
    """SimCLR's loss written out: 2N anchors, each with one positive (its other view) and the
    2N - 2 other rows as negatives, averaged over the anchors."""
    z = F.normalize(torch.cat([z1, z2]).double(), dim=1)
    n2 = z.shape[0]
    n = n2 // 2
    total = 0.0
    for i in range(n2):
        positive = (i + n) % n2
        sims = [float(z[i] @ z[k]) / temperature for k in range(n2)]
        denominator = sum(math.exp(sims[k]) for k in range(n2) if k != i)
        total += -math.log(math.exp(sims[positive]) / denominator)
    return total / n2


@pytest.mark.parametrize(("batch", "dim", "temperature"), [(2, 3, 0.1), (5, 8, 0.5), (16, 4, 1.0)])
def test_ntxent_matches_the_reference(batch: int, dim: int, temperature: float) -> None:
    gen = torch.Generator().manual_seed(batch)
    z1 = torch.randn(batch, dim, generator=gen) * 3
    z2 = torch.randn(batch, dim, generator=gen)
    got = NTXentLoss(temperature)(z1, z2)
    assert got.item() == pytest.approx(reference_ntxent(z1, z2, temperature), rel=1e-5)
    # Symmetric in the two views; scale-free (features are L2-normalised first).
    assert NTXentLoss(temperature)(z2, z1).item() == pytest.approx(got.item(), rel=1e-6)
    assert NTXentLoss(temperature)(z1 * 7, z2).item() == pytest.approx(got.item(), rel=1e-5)


def test_ntxent_default_temperature_and_bad_input() -> None:
    assert NTXentLoss().temperature == 0.1
    with pytest.raises(UpstreamError, match="temperature"):
        NTXentLoss(0.0)
    with pytest.raises(ValueError, match="shape"):
        NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3))


def test_gather_is_identity_without_a_process_group() -> None:
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


def test_clip_loss_is_open_clips_local_loss_with_gradient_gather() -> None:
    loss = clip_loss(world_size=4, rank=2)
    assert (loss.local_loss, loss.gather_with_grad, loss.rank, loss.world_size) == (
        True,
        True,
        2,
        4,
    )


# --- one process with the whole batch == two ranks with half each -----------------------------

BATCH, IN_DIM, DIM = 8, 5, 4
WORLD = 2


class ClipPair(nn.Module):
    """Stand-in for a CLIP model: two linear towers and a learnable logit scale."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Linear(IN_DIM, DIM)
        self.text = nn.Linear(IN_DIM + 1, DIM)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(
        self, image: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.image(image), dim=-1)
        text_features = F.normalize(self.text(text), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


def _losses(
    simclr: nn.Module, clip: nn.Module, data: dict[str, torch.Tensor], rank: int, world: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both losses on this rank's rows of the batch."""
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    v1, v2 = data["view1"][rows], data["view2"][rows]
    # Both views through one forward, as a SimCLR step does (and DDP wants).
    z1, z2 = simclr(torch.cat([v1, v2])).chunk(2)
    ntxent = NTXentLoss(0.2)(z1, z2)
    contrastive = clip_loss(world, rank)(*clip(data["image"][rows], data["text"][rows]))
    return ntxent, contrastive


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in module.named_parameters()}


def _rank_worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        start = torch.load(Path(folder) / "start.pt")
        simclr, clip = nn.Linear(IN_DIM, DIM), ClipPair()
        simclr.load_state_dict(start["simclr"])
        clip.load_state_dict(start["clip"])
        # DDP averages parameter gradients over ranks after backward: what we compare.
        ddp_simclr, ddp_clip = DistributedDataParallel(simclr), DistributedDataParallel(clip)
        ntxent, contrastive = _losses(ddp_simclr, ddp_clip, start["data"], rank, WORLD)
        (ntxent + contrastive).backward()
        torch.save(
            {
                "ntxent": ntxent.detach(),
                "clip": contrastive.detach(),
                "simclr_grads": _grads(simclr),
                "clip_grads": _grads(clip),
            },
            Path(folder) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_split_batch_gives_the_same_loss_and_gradients(tmp_path: Path) -> None:
    torch.manual_seed(0)
    simclr, clip = nn.Linear(IN_DIM, DIM), ClipPair()
    data = {
        "view1": torch.randn(BATCH, IN_DIM),
        "view2": torch.randn(BATCH, IN_DIM),
        "image": torch.randn(BATCH, IN_DIM),
        "text": torch.randn(BATCH, IN_DIM + 1),
    }
    torch.save(
        {"simclr": simclr.state_dict(), "clip": clip.state_dict(), "data": data},
        tmp_path / "start.pt",
    )
    ntxent, contrastive = _losses(simclr, clip, data, rank=0, world=1)
    (ntxent + contrastive).backward()

    mp.spawn(_rank_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    # Each rank's loss is its local mean, so the mean over ranks is the whole-batch loss ...
    assert torch.stack([r["ntxent"] for r in ranks]).mean().item() == pytest.approx(
        ntxent.item(), abs=1e-5
    )
    assert torch.stack([r["clip"] for r in ranks]).mean().item() == pytest.approx(
        contrastive.item(), abs=1e-5
    )
    # ... and the local halves really differ, so the check above is not vacuous.
    assert abs(ranks[0]["ntxent"].item() - ranks[1]["ntxent"].item()) > 1e-3
    # ... and DDP's averaged gradients equal the whole-batch gradients, on every rank.
    for key, module in (("simclr_grads", simclr), ("clip_grads", clip)):
        for name, grad in _grads(module).items():
            assert grad.abs().max() > 0
            for r in ranks:
                torch.testing.assert_close(r[key][name], grad, atol=1e-5, rtol=0)


# --- projection head --------------------------------------------------------------------------


def test_projection_head_defaults_and_shapes() -> None:
    # SimCLR's sizing: hidden as wide as the features, 128 out.
    head = ProjectionHead(64)
    assert (head.hidden_dim, head.out_dim) == (64, 128)
    layers = [type(m).__name__ for m in head]
    assert layers == ["Linear", "BatchNorm1d", "ReLU"] * 2 + ["Linear"]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [64, 64, 128]
    assert [m.bias is None for m in head if isinstance(m, nn.Linear)] == [True, True, False]

    small = ProjectionHead(12, hidden_dim=16, out_dim=6)
    assert small(torch.randn(4, 12)).shape == (4, 6)
    assert small.eval()(torch.randn(1, 12)).shape == (1, 6)


# --- augmentations ----------------------------------------------------------------------------


def _photo(mode: str = "RGB") -> Image.Image:
    gen = torch.Generator().manual_seed(3)
    pixels = (torch.rand(40, 48, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels).convert(mode)


def test_simclr_views_shape_range_difference_and_seed() -> None:
    views = augment.simclr_views(32)
    torch.manual_seed(11)
    out = views(_photo())
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out[0], out[1])
    torch.manual_seed(11)
    assert torch.equal(views(_photo()), out)
    # A grey image still gives three channels.
    assert views(_photo("L")).shape == (2, 3, 32, 32)


def test_transforms_pickle_and_keep_their_randomness_source() -> None:
    for make, shape in (
        (augment.simclr_views, (2, 3, 24, 24)),
        (augment.clip_train, (3, 24, 24)),
        (augment.supervised_train, (3, 24, 24)),
    ):
        transform = make(24)
        copy = pickle.loads(pickle.dumps(transform))
        torch.manual_seed(5)
        first = transform(_photo())
        torch.manual_seed(5)
        assert torch.equal(copy(_photo()), first)
        assert first.shape == shape and first.min() >= 0 and first.max() <= 1


def test_blur_kernel_is_a_tenth_and_odd() -> None:
    assert [augment.blur_kernel_size(s) for s in (16, 32, 96, 224)] == [1, 3, 9, 23]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_image_size_is_rejected(bad: object) -> None:
    with pytest.raises(UpstreamError, match="image_size"):
        augment.simclr_views(bad)  # type: ignore[arg-type]
