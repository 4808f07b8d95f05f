"""Freed memory kept by malloc: training steps stop page-faulting their activations anew."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys

import pytest

from upstream import allocator

# Real training steps of a small conv net in a fresh process (the setting is process-wide and
# the test process has it already, from other tests' training runs).
_STEPS = r"""
import json, resource, sys
import torch
from upstream import allocator
kept = allocator.keep_freed_memory() if sys.argv[1] == "1" else None
torch.manual_seed(0)
net = torch.nn.Sequential(
    torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
    torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10),
)
opt = torch.optim.AdamW(net.parameters())
x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))
def step():
    opt.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(net(x), y).backward()
    opt.step()
for _ in range(8):  # the heap grows to the step's peak
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults_per_step(keep: bool) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _STEPS, "1" if keep else "0"], check=True,
                         capture_output=True, text=True, timeout=300).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc: Linux")
def test_kept_memory_stops_the_page_faults_of_every_step() -> None:
    default = _faults_per_step(keep=False)
    kept = _faults_per_step(keep=True)
    assert kept["kept"] is True
    # Default glibc maps each step's large blocks afresh: thousands of faults a step.
    assert default["faults"] > 500, default
    # Kept: none but the odd late growth of the heap (one 16 MiB stretch, ~4,000 faults once).
    assert kept["faults"] < default["faults"] / 10, (default, kept)


def test_without_glibc_it_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_libc(*_: object, **__: object) -> None:
        raise OSError("no such library")

    allocator.keep_freed_memory.cache_clear()
    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    try:
        assert allocator.keep_freed_memory() is False
    finally:
        allocator.keep_freed_memory.cache_clear()
