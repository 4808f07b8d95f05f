"""Frozen features: extraction, and a stored cache keyed by the tower's and the data's
fingerprints.

A tower in eval mode maps a data set to the same features every time, so every probe of a
grid (every k, seed and C), every zero-shot head, and every later call on the same tower and
data (another grid, an evaluation of LP models) reads them from one file instead of running
the tower again. The key is (tower fingerprint, data fingerprint, model name,
:data:`FORMAT`): the tower fingerprint hashes the image tower's weights, so two checkpoints
holding the same tower share their features, and any change to the weights misses.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from upstream.errors import UpstreamError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

FEATURE_BATCH = 256
#: Value of the ``format`` key of a feature file; bump when what is stored changes.
FORMAT = "upstream-features-1"


def extract_features(encoder: nn.Module, images: torch.Tensor, batch: int = FEATURE_BATCH,
                     desc: str = "features") -> torch.Tensor:
    """Eval-mode outputs of ``encoder`` on ``images`` (N, C, H, W in [0, 1]), on the CPU;
    batches go to the encoder's device."""
    import torch
    from tqdm.auto import tqdm

    was = encoder.training
    encoder.eval()
    dev = next(encoder.parameters()).device
    out = []
    starts = range(0, len(images), batch)
    with torch.inference_mode():
        for i in tqdm(starts, desc=desc, unit="batch", mininterval=1.0, disable=len(starts) < 5):
            out.append(encoder(images[i : i + batch].to(dev, non_blocking=True)).cpu())
    encoder.train(was)
    return torch.cat(out) if out else torch.empty(0)


def tower_fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A hash of a tower's weights (names, shapes, dtypes and values)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache() -> str:
    from upstream import tracking

    return str(tracking.home() / "cache" / "features")


def cache_uri(cache: str, tower: str, data: str, model_name: str) -> str:
    from upstream import storage

    return storage.join(cache or default_cache(), f"{model_name}-{tower}-{data}.pt")


def load_cached(uri: str, expect_rows: int) -> torch.Tensor | None:
    """The cached features at ``uri``, or None when absent or unusable (then recomputed)."""
    import torch

    from upstream import storage

    if not storage.exists(uri):
        return None
    with tempfile.TemporaryDirectory(prefix="upstream-features-") as tmp:
        try:
            local = storage.download_file(uri, Path(tmp, "f.pt"))
            obj = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is recomputed, not fatal
            log.warning("feature cache %s unreadable (%s); recomputing", uri, e)
            return None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        return None
    feats = obj.get("features")
    if not isinstance(feats, torch.Tensor) or feats.shape[0] != expect_rows:
        log.warning("feature cache %s does not fit the data (%s rows); recomputing", uri,
                    None if not isinstance(feats, torch.Tensor) else feats.shape[0])
        return None
    return feats


def cached_features(
    encoder: nn.Module,
    images: Callable[[], torch.Tensor],
    rows: int,
    *,
    tower: str,
    data: str,
    model_name: str,
    cache: str,
    desc: str = "features",
) -> tuple[torch.Tensor, bool]:
    """The features of a data set of ``rows`` images under ``encoder``: from the cache, or
    computed from ``images()`` (called only on a miss) and stored. Returns (features, hit).

    ``tower`` and ``data`` are the fingerprints that key the entry.
    """
    from upstream import models

    uri = cache_uri(cache, tower, data, model_name)
    loaded = load_cached(uri, rows)
    if loaded is not None:
        log.info("%s: %d cached features from %s", desc, rows, uri)
        return loaded, True
    tensor = images()
    if len(tensor) != rows:
        raise UpstreamError(f"{desc}: {len(tensor)} images where {rows} were expected")
    feats = extract_features(encoder, tensor, desc=desc).float().contiguous()
    try:
        models.save_file({"format": FORMAT, "features": feats, "tower": tower, "data": data,
                          "model_name": model_name}, uri)
    except Exception as e:  # noqa: BLE001 - the cache only saves time: a failed write costs none
        log.warning("could not store features at %s: %s", uri, e)
    return feats, False
