"""Pre-training objectives: SimCLR's NT-Xent and CLIP's loss (SimCLR's projection head is
:class:`upstream.models.ProjectionHead`).

Both contrastive losses see every rank's batch as negatives: features are gathered across
ranks *with* gradients and each rank scores its own rows against all gathered columns (open_clip's
``local_loss=True, gather_with_grad=True``; SLIP's ``SIMCLRLoss``). With equal local batches that
makes training on N ranks the same optimisation as on one process with the whole batch:

- the per-rank loss is the mean over the rank's own anchors, so the mean over ranks is the mean
  over all anchors, i.e. the one-process loss;
- the gather's backward sums, into each rank's local features, the gradients that every rank's
  loss sends to them, so rank r's parameter gradient is d(sum of all ranks' losses)/dθ through
  rank r's inputs; DDP's average of those over ranks is d(mean of the losses)/dθ, again the
  one-process gradient.

``tests/test_objectives.py`` checks both on a real 2-process gloo group. Local batches must have
the same size on every rank (the gather needs equal shapes): drop the last, partial batch.
"""

from __future__ import annotations

import open_clip
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed._functional_collectives import all_gather_single

from upstream.errors import UpstreamError


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` from every rank, concatenated along dim 0 in rank order; ``x`` itself when not
    distributed.

    Gradients flow back to each rank's own part (summed over the ranks that used it). torch
    2.14 deprecates ``torch.distributed.nn.functional.all_gather`` (what open_clip calls) in
    favour of ``all_gather_single``, which has the same autograd and warns nothing.
    """
    _, world_size = _world()
    if world_size == 1:
        return x
    return all_gather_single(x.contiguous(), 0, dist.group.WORLD)


class NTXentLoss(nn.Module):
    """SimCLR's normalised temperature-scaled cross entropy over two views of a batch.

    For local anchor i (global index g) of view a, the positive is view b of the same image
    and the negatives are every other gathered row of both views: logits are
    ``[a_i · b_j / τ for all j] ++ [a_i · a_j / τ for j != g]`` with target g; likewise for
    view b. The loss is the mean over the 2 × local_batch anchors. Rank and world size are read
    from ``torch.distributed`` at each call, so the same module works in one process and under
    DDP.
    """

    def __init__(self, temperature: float = 0.1):
        super().__init__()
        if not temperature > 0:
            raise UpstreamError(f"NT-Xent temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.ndim != 2 or z1.shape != z2.shape:
            raise ValueError(
                f"NT-Xent needs two (batch, dim) tensors of one shape, got {tuple(z1.shape)} "
                f"and {tuple(z2.shape)}"
            )
        rank, world_size = _world()
        local_batch = z1.shape[0]
        q_a = F.normalize(z1, dim=-1)
        q_b = F.normalize(z2, dim=-1)
        k_a = gather_with_grad(q_a)
        k_b = gather_with_grad(q_b)

        labels = torch.arange(local_batch, device=z1.device) + rank * local_batch
        # An anchor against itself is not a negative: -inf drops it from the softmax exactly
        # (SLIP subtracts 1e9, which is the same in float32 but not an exact zero).
        self_mask = F.one_hot(labels, local_batch * world_size).bool()
        logits_ab = q_a @ k_b.T / self.temperature
        logits_ba = q_b @ k_a.T / self.temperature
        logits_aa = (q_a @ k_a.T / self.temperature).masked_fill(self_mask, float("-inf"))
        logits_bb = (q_b @ k_b.T / self.temperature).masked_fill(self_mask, float("-inf"))

        loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), labels)
        loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), labels)
        return (loss_a + loss_b) / 2


def clip_loss(world_size: int, rank: int) -> open_clip.ClipLoss:
    """open_clip's CLIP loss, with the same local-rows-against-gathered-columns layout as
    :class:`NTXentLoss` (call it as ``loss(image_features, text_features, logit_scale)`` on
    L2-normalised features, as open_clip's models return them)."""
    return open_clip.ClipLoss(
        local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size
    )
