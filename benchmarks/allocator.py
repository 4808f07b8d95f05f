"""Training steps/s with freed memory kept in the process vs glibc's default malloc.

    .venv/bin/python benchmarks/allocator.py [--quick] [--model M] [--batch-size B]

The same bare pre-training step (forward, backward, AdamW on in-memory tensors, clip loss,
``--model`` default ``upstream-tiny-rn`` at 32 px, torch's default threads) in fresh
processes, alternating:

- ``default``: glibc's malloc as it comes (blocks above its mmap threshold mapped and
  unmapped each time, the heap's top trimmed);
- ``kept``: after :func:`upstream.allocator.keep_freed_memory`, as the training stages run.

Each process times ``--steps`` steps after a warm-up and counts its minor page faults per
step. Prints both, then ``ratio kept_vs_default`` (the median over ``--repeats`` pairs of
runs, each pair seconds apart) and ``ratio faults_kept_vs_default``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

# Its own step rather than benchmarks/pretrain.py's bare(), which builds the model inside the
# window whose page faults are counted here.
_CHILD = r"""
import json, resource, sys, time
import torch
from upstream import allocator, models, training
from upstream.pretrain import distributed
from upstream.pretrain.stage import Objective, PretrainConfig

model, batch, steps, keep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
if keep:
    assert allocator.keep_freed_memory(), "glibc refused the thresholds"
config = PretrainConfig.parse(data="s3://b/d", method="clip", model=model, batch_size=batch)
torch.manual_seed(0)
net = models.build_pretrain_model(model, "clip", 8)
tokenizer = models.tokenizer(model)
loss_module = Objective.build(config, net, distributed.init(), tokenizer)
optimizer = training.make_optimizer(net, config.lr, config.weight_decay)
size = net.encoder.image_size
images, labels = torch.rand(batch, 3, size, size), torch.randint(0, 8, (batch,))
tokens = tokenizer(["a photo of a shape."] * batch)

def step():
    optimizer.zero_grad(set_to_none=True)
    loss_module(images, labels, tokens).backward()
    optimizer.step()

for _ in range(5):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = time.perf_counter()
for _ in range(steps):
    step()
seconds = time.perf_counter() - t
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(json.dumps({"steps_per_s": steps / seconds, "faults_per_step": faults / steps}))
"""


def run(model: str, batch: int, steps: int, keep: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, model, str(batch), str(steps), "1" if keep else "0"],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="upstream-tiny-rn")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="20 steps, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 20, 2
    pairs = []
    for r in range(args.repeats):
        default = run(args.model, args.batch_size, args.steps, keep=False)
        kept = run(args.model, args.batch_size, args.steps, keep=True)
        pairs.append((default, kept))
        print(f"round {r + 1}: default {default['steps_per_s'] * args.batch_size:.0f} "
              f"samples/s ({default['faults_per_step']:.0f} page faults a step), kept "
              f"{kept['steps_per_s'] * args.batch_size:.0f} samples/s "
              f"({kept['faults_per_step']:.0f})", flush=True)
    speed = statistics.median(k["steps_per_s"] / d["steps_per_s"] for d, k in pairs)
    faults = statistics.median(
        k["faults_per_step"] / max(1.0, d["faults_per_step"]) for d, k in pairs
    )
    print(f"\nmodel {args.model}, batch {args.batch_size}, {args.steps} steps, "
          f"{args.repeats} rounds")
    print(f"ratio kept_vs_default {speed:.2f}")
    print(f"ratio faults_kept_vs_default {faults:.3f}")


if __name__ == "__main__":
    main()
