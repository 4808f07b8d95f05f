"""Image hashes for de-duplication, and a near-duplicate search that scales.

``content_hash`` finds exact duplicates (same size, same RGB pixels, whatever the file
encoding); ``phash`` is the 64-bit DCT perceptual hash, computed as ``imagehash.phash`` does
(grayscale 32×32, 2-D DCT-II without normalisation, the top-left 8×8 block *including* the DC
term, bits = coefficient > median of the 64, first coefficient in the most significant bit), so
that hashes and distances agree with the tool most people know. The DC bit is nearly always 1,
which costs one bit of the 64 but keeps the hashes comparable.

``near_duplicates`` keeps the first image in the given order and drops every later one within
``distance`` bits of an image already kept, so no two kept images are near duplicates. It
uses pigeonhole banding: two 64-bit hashes within ``d`` bits agree exactly on at least one of
``d + 1`` disjoint bands, so only hashes sharing a band value are compared (vectorised with
numpy), never all pairs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_BITS = 64


def content_hash(img: Image.Image) -> int:
    """A 64-bit hash of the image's size and RGB pixels: equal for identical images."""
    rgb = img.convert("RGB")
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{rgb.width}x{rgb.height}".encode())
    h.update(rgb.tobytes())
    return int.from_bytes(h.digest(), "big")


def phash(img: Image.Image) -> int:
    """The 64-bit DCT perceptual hash of ``img`` (as ``imagehash.phash``), as an int."""
    small = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    coefficients = dctn(np.asarray(small, dtype=np.float64), type=2)[:8, :8]
    bits = (coefficients > np.median(coefficients)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _bands(distance: int) -> list[tuple[int, int]]:
    """``(shift, mask)`` of ``distance + 1`` disjoint bands covering the 64 bits."""
    count = distance + 1
    edges = [round(k * HASH_BITS / count) for k in range(count + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:], strict=False)]


def _readable(hashes: Sequence[int | None]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the readable hashes, and those hashes as uint64."""
    readable = [(k, int(h)) for k, h in enumerate(hashes) if h is not None]
    positions = np.array([k for k, _ in readable], dtype=np.int64)
    values = np.array([h for _, h in readable], dtype=np.uint64)
    return positions, values


def _close_pairs(values: np.ndarray, distance: int) -> np.ndarray:
    """All ``(a, b)``, a < b, with ``values[a]`` and ``values[b]`` within ``distance`` bits.

    For each band the values are sorted by band value, and each is compared (vectorised) with
    the ones after it in the same run of equal band values: only pairs sharing a band value
    are ever compared.
    """
    found: list[np.ndarray] = []
    positions = np.arange(len(values))
    for shift, mask in _bands(distance):
        keys = (values >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        ordered, candidates = keys[order], values[order]
        # Where each run of equal band values ends, for every position in it.
        starts = np.flatnonzero(np.diff(ordered)) + 1
        ends = np.append(starts, len(ordered))[np.searchsorted(starts, positions, side="right")]
        active = positions[ends - positions > 1]
        step = 1
        while active.size:
            later = active + step
            hit = np.bitwise_count(candidates[active] ^ candidates[later]) <= distance
            if hit.any():
                a, b = order[active[hit]], order[later[hit]]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
            step += 1
            # Only positions whose run reaches `step` places on still have partners.
            active = active[ends[active] > active + step]
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    # A pair sharing several bands was found once per band.
    return np.unique(np.concatenate(found), axis=0)


def near_duplicate_pairs(hashes: Sequence[int | None], distance: int) -> list[tuple[int, int]]:
    """``(kept, dropped)`` index pairs, by dropped index: each dropped hash is within
    ``distance`` bits of ``kept``, the earliest kept one. None (an unreadable image) is neither
    kept nor compared.

    Equal hashes are collapsed first (a thousand copies of one image are one value, not half a
    million pairs); the greedy keep-first pass then runs over the few close pairs of distinct
    values. Cost: about ``n² (d + 1) / 2^(64 / (d + 1) + 1)`` vectorised comparisons for ``n``
    distinct, uniformly spread hashes — seconds for a million at the default ``d = 4``, but
    growing fast with ``d`` (narrower bands).
    """
    if not 0 <= distance < HASH_BITS:
        raise ValueError(f"distance must be 0..{HASH_BITS - 1} bits (got {distance})")
    positions, values = _readable(hashes)
    unique, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    # Distinct values in order of first appearance, so that "earlier" means source order.
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(len(by_first))
    distinct = unique[by_first]
    kept = np.ones(len(distinct), dtype=bool)
    partner = np.arange(len(distinct))
    pairs = _close_pairs(distinct, distance) if distance else np.zeros((0, 2), dtype=np.int64)
    # By the later value, then the earlier: when (a, b) comes up, a's fate is already final.
    for a, b in pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))].tolist():
        if kept[a] and kept[b]:
            kept[b] = False
            partner[b] = a
    value_of = rank[inverse]  # each readable hash's distinct value
    keeper_value = np.where(kept[value_of], value_of, partner[value_of])
    keeper = positions[first[by_first]][keeper_value]
    dropped = keeper != positions
    return list(zip(keeper[dropped].tolist(), positions[dropped].tolist(), strict=True))


def near_duplicates(hashes: Sequence[int | None], distance: int) -> list[int]:
    """Indices to drop, ascending: images within ``distance`` bits of an earlier kept one."""
    return [dropped for _, dropped in near_duplicate_pairs(hashes, distance)]


def exact_duplicate_pairs(hashes: Sequence[int | None]) -> list[tuple[int, int]]:
    """``(kept, dropped)`` pairs of equal hashes, the first occurrence kept."""
    return near_duplicate_pairs(hashes, 0)
