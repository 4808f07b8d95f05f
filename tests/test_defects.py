"""The smaller defects of issue 12, one drill each: file modes, caption tables that reach
outside their folder, a transfer run whose k is too large, a killed shard's scratch folder,
a state pointer leading outside its output, checkpoint files that are not what they seem,
typer's usage errors, skip reasons with memory addresses, and samples with no image."""

from __future__ import annotations

import io
import os
import resource
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from upstream import models, storage
from upstream.errors import UpstreamError
from upstream.pretrain import trainstate

UMASK = 0o022


@pytest.fixture
def umask() -> Iterator[int]:
    """A known umask for the test, so that the mode every file should have is known."""
    old = os.umask(UMASK)
    try:
        yield UMASK
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def upstream_cli(*args: str, env: dict[str, str] | None = None,
                 timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "upstream", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=timeout)


def one_line_error(stderr: str, code: int, *needles: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stderr)
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- a WebDataset source with a bad image and a sample with no image -------------------------


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            key = sample["__key__"].decode()
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def wds_set(tmp_path_factory: pytest.TempPathFactory, tracking_home: Path) -> dict[str, Any]:
    """One shard stage call over 8 good images, one that is not an image and one sample
    with no image at all; its output folder and manifest."""
    from upstream.shards.stage import ShardConfig, shard

    root = tmp_path_factory.mktemp("wds")
    samples = [{"__key__": f"{i:04d}".encode(), "png": _png((30 * i, 0, 0)),
                "cls": str(i % 2).encode()} for i in range(8)]
    samples.append({"__key__": b"0008", "png": b"this is not a png", "cls": b"0"})
    samples.append({"__key__": b"0009", "txt": b"a caption and no image", "cls": b"1"})
    (root / "in").mkdir()
    _write_tar(root / "in" / "part-0.tar", samples)
    old = os.umask(UMASK)
    try:
        manifest = shard(ShardConfig.parse(source=f"wds:{root / 'in'}", output=str(root / "out"),
                                           image_size=16, kshot="1", kshot_trials=2, workers=1))
    finally:
        os.umask(old)
    return {"out": root / "out", "manifest": manifest}


def test_every_file_of_a_shard_set_has_the_same_mode(wds_set: dict[str, Any]) -> None:
    out: Path = wds_set["out"]
    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.relative_to(out).as_posix() for p in files}
    assert {"manifest.json", "sizes.json", "kshot/k1-seed0.json", "shard-000000.tar"} <= names
    # Before: manifest.json, sizes.json and kshot/*.json were 0600 (mkstemp), shards 0644.
    assert {p.relative_to(out).as_posix(): oct(mode(p)) for p in files} == \
        {name: oct(0o666 & ~UMASK) for name in names}


def test_state_pointer_and_checkpoint_have_the_same_mode(tmp_path: Path, umask: int) -> None:
    trainstate.save(str(tmp_path), 3, {"w": torch.zeros(2)})
    models.save_file({"format": models.CHECKPOINT_FORMAT}, str(tmp_path / "checkpoint.pt"))
    for path in (tmp_path / "state" / "latest", tmp_path / "state" / "step-00000003.pt",
                 tmp_path / "checkpoint.pt"):
        assert mode(path) == 0o666 & ~umask, path
    storage.write_json(str(tmp_path / "x.json"), {"a": 1})
    assert mode(tmp_path / "x.json") == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "state", "x.json"]


def test_skip_reasons_have_no_memory_addresses(wds_set: dict[str, Any]) -> None:
    reasons = [item["reason"] for item in wds_set["manifest"]["skipped"]["images"]]
    # Before: "... cannot identify image file <_io.BytesIO object at 0x7f…>", new every run.
    assert "cannot read image 0008 in part-0.tar: UnidentifiedImageError: cannot identify " \
        "image file" in reasons
    assert not any("0x" in r or " at " in r for r in reasons), reasons
    assert (wds_set["out"] / "manifest.json").read_text().count("0x") == 0


def test_samples_with_no_image_are_counted_as_skipped(wds_set: dict[str, Any]) -> None:
    manifest = wds_set["manifest"]
    assert manifest["num_samples"] == 8
    # Before: only the unreadable one was counted; the imageless one vanished from the record.
    assert manifest["skipped"]["count"] == 2
    source = f"wds:{wds_set['out'].parent / 'in'}"
    assert {"source": source, "index": None,
            "reason": "sample 0009 in part-0.tar has no image"} in manifest["skipped"]["images"]


# --- caption tables ---------------------------------------------------------------------------


def _table(folder: Path, paths: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table = folder / "t.csv"
    table.write_text("image,caption\n" + "".join(f"{p},a caption\n" for p in paths))
    return table


def test_caption_table_paths_stay_in_its_folder(tmp_path: Path) -> None:
    from upstream.data import open_source

    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    (tmp_path / "tables").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "tables" / "inside.png")
    (tmp_path / "tables" / "link.png").symlink_to(tmp_path / "outside.png")
    for bad in ("../outside.png", str(tmp_path / "outside.png"), "link.png"):
        table = _table(tmp_path / "tables", ["inside.png", bad])
        # Before: opened, and the foreign file would be copied into the shards.
        with pytest.raises(UpstreamError, match=r"1 of 2 image paths .* lead outside its "
                           r"folder.*allow-outside-paths") as e:
            open_source(f"captions:{table}", "train")
        assert "\n" not in str(e.value)
        allowed = open_source(f"captions:{table}", "train", allow_outside_paths=True)
        assert len(allowed) == 2
    assert len(open_source(f"captions:{_table(tmp_path / 'tables', ['inside.png'])}",
                           "train")) == 1


def test_the_option_is_a_shard_field_in_help_and_not_in_the_fingerprint() -> None:
    from typer.testing import CliRunner

    from upstream.cli import app
    from upstream.shards.stage import ShardConfig, data_fingerprint

    help_text = CliRunner().invoke(app, ["shard", "--help"], env={"COLUMNS": "200"}).output
    assert "--allow-outside-paths" in help_text and "outside the table's folder" in help_text
    # Allowing changes what is refused, never what is written: the same sets keep their place.
    assert data_fingerprint(ShardConfig.parse(allow_outside_paths=True)) == \
        data_fingerprint(ShardConfig.parse())


# --- run transfer: k against the downstream classes, before anything starts ------------------


def test_transfer_k_is_checked_before_the_run() -> None:
    from upstream.pipelines import launch

    with pytest.raises(UpstreamError, match=r"finetune_shots=100000 .* class 'eight' of "
                       r"downstream_source digits \(train\) has only \d+") as e:
        launch._check_values("transfer", {"finetune_shots": "100000"})
    assert "\n" not in str(e.value)
    with pytest.raises(UpstreamError, match=r"finetune_shots=0 .* need 201 images"):
        launch._check_values("transfer", {"finetune_shots": "0", "finetune_val_per_class": 200})
    launch._check_values("transfer", {})  # the defaults fit


def test_run_transfer_with_too_large_k_fails_in_seconds(tmp_path: Path) -> None:
    # UPSTREAM_HOME is a file, so that a run that got past the check (as before) fails at
    # once instead of starting services and training for minutes.
    home = tmp_path / "home"
    home.write_text("not a folder")
    before = _child_cpu_seconds()
    result = upstream_cli("run", "transfer", "--local", "--finetune-shots", "1,100000",
                          env={"UPSTREAM_HOME": str(home)})
    one_line_error(result.stderr, result.returncode, "finetune_shots=1,100000", "has only")
    assert result.stdout == ""
    # CPU seconds rather than wall time, which a busy machine stretches: ~3 s here (imports
    # and the shard plan), where the run got to the finetune step after ~44 s of compute.
    assert _child_cpu_seconds() - before < 20


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_a_failed_steps_cause_is_in_the_error_line(tmp_path: Path) -> None:
    from upstream.pipelines.progress import _cause

    log = tmp_path / "finetune.log"
    log.write_text("--- the step's output ---\nTraceback (most recent call last):\n"
                   '  File "x.py", line 1, in <module>\n'
                   "upstream.errors.UpstreamError: finetune: k=9 shots need 19 images\n"
                   "--- exit code 1 ---\n"
                   "2026-12-01 16:53:35,463 ERROR root: Task 'finetune' finished with status "
                   "FAILURE\n")
    assert _cause(log) == "finetune: k=9 shots need 19 images"
    log.write_text("Traceback (most recent call last):\nKeyError: 'finetune'\n")
    assert _cause(log) == "KeyError: 'finetune'"
    log.write_text("no traceback\n")
    assert _cause(log) is None


# --- a killed shard's scratch folder ----------------------------------------------------------

_HOLD = """
import sys, time
from upstream import scratch
with scratch.folder("upstream-shard-") as path:
    (path / ".shard-000000.tar.part").write_bytes(b"half a shard")
    print(path, flush=True)
    time.sleep(60)
"""


def _hold_scratch(root: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(root)})
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def test_stale_scratch_folders_go_and_live_ones_stay(tmp_path: Path) -> None:
    from upstream import scratch

    killed, stale = _hold_scratch(tmp_path)
    alive, held = _hold_scratch(tmp_path)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        assert (stale / ".shard-000000.tar.part").exists()
        (tmp_path / "upstream-shard-old").mkdir()  # no lock file: not ours to judge
        assert scratch.remove_stale("upstream-shard-", str(tmp_path)) == [stale]
        assert not stale.exists() and (held / ".shard-000000.tar.part").exists()
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.integration
def test_a_resume_cleans_a_killed_shards_scratch_part(
    local_services: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from upstream.shards.stage import ShardConfig, shard

    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    output = f"s3://upstream/test-defects/{uuid.uuid4().hex[:8]}"
    args = {"source": "digits", "samples_per_class": 20, "image_size": 64, "shard_size": 4,
            "workers": 1}
    cmd = ["shard", "--output", output,
           *[x for k, v in args.items() for x in ("--" + k.replace("_", "-"), str(v))]]
    proc = subprocess.Popen([sys.executable, "-m", "upstream", *cmd], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env={**os.environ, "TMPDIR": str(scratch_root)})
    try:
        deadline = time.monotonic() + 240  # a busy machine takes long to start Python
        while time.monotonic() < deadline and proc.poll() is None:
            if list(scratch_root.glob("upstream-*/*.part")):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert list(scratch_root.glob("upstream-*"))  # what the kill left
    # The resume runs in this process, with the same scratch root as the killed one.
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))
    manifest = shard(ShardConfig.parse(output=output, **args))
    assert manifest["num_samples"] == 200
    # Before: the killed run's upstream-XXXX/.shard-N.tar.part stayed for good.
    assert list(scratch_root.iterdir()) == []
    storage.remove(output)


# --- the state pointer and checkpoint files ---------------------------------------------------


def test_state_pointer_outside_the_output_is_refused_unread(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # A genuine state file, but another run's: following the pointer would resume from it.
    trainstate.save(str(tmp_path / "other"), 1, {"w": torch.zeros(1)})
    (out / "state").mkdir(parents=True)
    for name in ("../../other/state/step-00000001.pt", "/etc/passwd", "step-1.pt\nx"):
        (out / "state" / "latest").write_text(name)
        with pytest.raises(UpstreamError, match=r"not a state file of this output") as e:
            trainstate.find(str(out), "auto")
        assert "\n" not in str(e.value) and "torch file" not in str(e.value)


def test_a_checkpoint_file_without_pt_is_read_as_a_file(tmp_path: Path) -> None:
    models.save_file({"format": models.CHECKPOINT_FORMAT, "w": torch.ones(1)},
                     str(tmp_path / "ckpt.bin"))
    # Before: "checkpoint …/ckpt.bin/checkpoint.pt does not exist".
    assert torch.equal(models.load_checkpoint(str(tmp_path / "ckpt.bin"))["w"], torch.ones(1))
    (tmp_path / "notes.txt").write_text("some notes\n")
    with pytest.raises(UpstreamError, match=r"notes\.txt is not a readable torch file: it is "
                       r"text \('some notes'…\)"):
        models.load_checkpoint(str(tmp_path / "notes.txt"))


def test_a_text_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_text("hello\n")
    (tmp_path / "empty" / "checkpoint.pt").parent.mkdir()
    (tmp_path / "empty" / "checkpoint.pt").write_bytes(b"")
    (tmp_path / "cut.pt").write_bytes(b"\x80\x02}q\x00")
    cases = {str(tmp_path): "it is text ('hello'…)",  # before: "… torch file: 101"
             str(tmp_path / "empty"): "the file is empty",
             str(tmp_path / "cut.pt"): "the file is damaged or cut short"}
    for uri, why in cases.items():
        with pytest.raises(UpstreamError) as e:
            models.load_checkpoint(uri)
        assert why in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- typer's usage errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("args", "needle"), [
    (["shard", "--shard-size", "abc"], "upstream shard: Invalid value for '--shard-size'"),
    (["shard", "--no-such-option"], "No such option: --no-such-option"),
    (["pretrain", "--epochs"], "requires an argument"),
    (["services", "bogus"], "upstream services: No such command 'bogus'"),
    (["study", "plan"], "upstream study plan: Missing argument"),
])
def test_usage_errors_are_one_line(args: list[str], needle: str) -> None:
    from typer.testing import CliRunner

    from upstream.cli import app

    result = CliRunner().invoke(app, args)
    # Before: typer's boxed message, 6 lines.
    one_line_error(result.stderr, result.exit_code, needle)


def test_usage_error_of_the_real_command_is_one_line() -> None:
    from typer.testing import CliRunner

    from upstream.cli import app

    result = upstream_cli("finetune", "--epochs", "many", timeout=300)
    one_line_error(result.stderr, result.returncode, "Invalid value for '--epochs'")
    bare = CliRunner().invoke(app, [])  # the bare command still shows its help
    assert "Usage:" in bare.output and "error" not in bare.stderr

