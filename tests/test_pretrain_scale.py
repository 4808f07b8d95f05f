"""Pre-training at scale, tested small: the three methods on one tower from the CLI, two gloo
processes against one, and a run killed with SIGKILL that resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from upstream import models
from upstream.errors import UpstreamError
from upstream.pretrain import PretrainConfig, pretrain, trainstate
from upstream.shards import loader

pytest_plugins = ["helpers_training"]
pytestmark = pytest.mark.usefixtures("training_env")
EXPERIMENT = "upstream-scale-tests"
UPSTREAM = str(Path(sys.executable).parent / "upstream")


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([UPSTREAM, "pretrain", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ.copy(), **kw)


def _visual(result_or_uri: Any) -> dict[str, torch.Tensor]:
    uri = result_or_uri["checkpoint"] if isinstance(result_or_uri, dict) else result_or_uri
    return models.load_checkpoint(uri)["visual"]


def test_three_methods_train_one_tower_from_the_cli(shapes_train: str, tmp_path: Path) -> None:
    """clip, simclr and supervised on torchvision's (tiny) ResNet: each trains from the CLI,
    and all three save a tower with the same parameters, which fine-tuning loads alike."""
    towers = {}
    for method in ("clip", "simclr", "supervised"):
        out = tmp_path / method
        proc = _cli("--data", shapes_train, "--output", str(out), "--method", method,
                    "--model", "upstream-tiny-tvrn", "--epochs", "1", "--batch-size", "16",
                    "--projection-hidden", "64", "--experiment", EXPERIMENT)
        text, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, text
        result = json.loads(text[text.rindex("{\n"):])
        assert result["steps"] == 4  # 64 samples / 16
        ckpt = models.load_checkpoint(str(out))
        assert ckpt["method"] == method and ckpt["architecture"].startswith("torchvision ResNet")
        towers[method] = ckpt["visual"]
        models.encoder_from_state("upstream-tiny-tvrn", ckpt["visual"])
    shapes = {m: {k: tuple(v.shape) for k, v in t.items()} for m, t in towers.items()}
    assert shapes["clip"] == shapes["simclr"] == shapes["supervised"]


def test_two_gloo_processes_match_one(shapes_train: str, tmp_path: Path, mlflow_store: Any) -> None:
    """torchrun with 2 CPU processes (gloo, DDP, CLIP loss over features gathered from both)
    takes the same steps as 1 process with the same global batch. Unshuffled, so that the two
    ranks' halves of each step (shards 2k and 2k+1 of 16 samples) are the 1-process batch; a
    LayerNorm tower (tiny ViT), so that no BatchNorm statistics differ between the two."""
    kw = dict(data=shapes_train, method="clip", model="upstream-tiny-vit", epochs=2,
              batch_size=32, shuffle=False, warmup_steps=1, lr=1e-3, experiment=EXPERIMENT)
    one = pretrain(PretrainConfig.parse(output=str(tmp_path / "one"), **kw))
    two = pretrain(PretrainConfig.parse(output=str(tmp_path / "two"), procs_per_node=2, **kw))
    assert one["steps"] == two["steps"] == 4
    losses_one = mlflow_store.history(one["mlflow_run_id"], "loss")
    losses_two = mlflow_store.history(two["mlflow_run_id"], "loss")
    assert len(losses_one) == len(losses_two) == 4
    assert losses_one == pytest.approx(losses_two, rel=1e-4, abs=1e-5)
    a, b = _visual(one), _visual(two)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    assert mlflow_store.run(two["mlflow_run_id"]).data.params["train.world_size"] == "2"


def test_killed_run_resumes_to_the_same_weights(shapes_train: str, tmp_path: Path) -> None:
    """A CLI run killed with SIGKILL mid-epoch, then started again (resume=auto), ends with
    bitwise the weights of a run that was never interrupted (deterministic mode, a data
    worker process, so that resuming skips batches inside the worker)."""
    args = ["--data", shapes_train, "--method", "supervised", "--epochs", "12",
            "--batch-size", "8", "--checkpoint-every", "5", "--deterministic",
            "--num-workers", "1", "--warmup-steps", "2", "--experiment", EXPERIMENT]
    whole = tmp_path / "whole"
    proc = _cli(*args, "--output", str(whole))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text

    cut = tmp_path / "cut"
    latest = cut / trainstate.STATE_DIR / trainstate.LATEST
    proc = _cli(*args, "--output", str(cut))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if latest.exists() and latest.read_text().strip() >= "step-00000010.pt":
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / models.CHECKPOINT_FILE).exists()  # killed, not finished
    stopped_at = int(latest.read_text().strip()[5:13])
    assert 10 <= stopped_at < 40 and stopped_at % 8  # mid-epoch (8 steps an epoch)

    proc = _cli(*args, "--output", str(cut))
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text
    assert f"resuming from {cut / 'state'}" in text
    a, b = _visual(str(whole)), _visual(str(cut))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Only the newest states are kept; every one loads with weights_only.
    kept = sorted(p.name for p in (cut / trainstate.STATE_DIR).glob("step-*.pt"))
    assert len(kept) == trainstate.KEEP
    state = torch.load(cut / trainstate.STATE_DIR / kept[-1], weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "position"} <= set(state)


def test_resume_refuses_another_model_and_a_dangling_pointer(
    shapes_train: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    kw = dict(data=shapes_train, output=str(out), method="supervised", epochs=1, batch_size=16,
              checkpoint_every=2, experiment=EXPERIMENT)
    pretrain(PretrainConfig.parse(**kw))
    (out / models.CHECKPOINT_FILE).unlink()  # as if it stopped after its last state
    state = out / trainstate.STATE_DIR
    before = sorted(p.name for p in state.iterdir())
    with pytest.raises(UpstreamError, match="is from a run with model='upstream-tiny-rn', "
                       "not 'upstream-tiny-vit'"):
        pretrain(PretrainConfig.parse(**kw | {"model": "upstream-tiny-vit"}))
    # A state from a version of upstream that orders samples otherwise would not resume to
    # the weights of an uninterrupted run.
    monkeypatch.setattr(loader, "SAMPLE_ORDER", loader.SAMPLE_ORDER + 1)
    with pytest.raises(UpstreamError, match=f"is from a run with sample_order="
                       f"{loader.SAMPLE_ORDER - 1}, not {loader.SAMPLE_ORDER}"):
        pretrain(PretrainConfig.parse(**kw))
    monkeypatch.undo()
    (state / trainstate.LATEST).write_text("step-00000099.pt")
    with pytest.raises(UpstreamError, match="names 'step-00000099.pt', which does not exist"):
        pretrain(PretrainConfig.parse(**kw))
    assert sorted(p.name for p in state.iterdir()) == before  # nothing overwritten
    assert not (out / models.CHECKPOINT_FILE).exists()
