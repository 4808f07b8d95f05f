"""The command line: --help everywhere, and one-line errors for bad input before compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [
    [], ["shard"], ["pretrain"], ["finetune"], ["evaluate"], ["compile"], ["run"],
    ["run", "transfer"], ["services"], ["services", "up"], ["services", "down"],
    ["services", "status"], ["services", "env"],
]


def upstream(*args: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "upstream", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=cwd, timeout=300,
    )


@pytest.fixture
def isolated(tmp_path: Path) -> dict[str, str]:
    """An environment with its own UPSTREAM_HOME and no S3/MLflow settings."""
    env = {"UPSTREAM_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        os.environ.pop(key, None)
    return env


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "upstream")
def test_help(command: list[str]) -> None:
    result = upstream(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_stage_options_come_from_the_config() -> None:
    from upstream.pretrain import PretrainConfig

    text = upstream("pretrain", "--help").stdout
    for name in PretrainConfig.model_fields:
        assert "--" + name.replace("_", "-") in text


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_negative_learning_rate(isolated: dict[str, str], tmp_path: Path) -> None:
    result = upstream("pretrain", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                      "--lr", "-0.1", env=isolated)
    one_line_error(result, "lr", "greater than 0")
    assert not (tmp_path / "o").exists()


def test_unknown_method(isolated: dict[str, str], tmp_path: Path) -> None:
    result = upstream("pretrain", "--data", str(tmp_path), "--method", "moco", env=isolated)
    one_line_error(result, "method", "moco")


def test_unknown_model(isolated: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert upstream("shard", "--source", "shapes", "--samples-per-class", "4", "--output",
                    str(out), env=isolated).returncode == 0
    result = upstream("pretrain", "--data", str(out), "--output", str(tmp_path / "o"),
                      "--model", "resnet-9000", env=isolated)
    one_line_error(result, "resnet-9000")
    assert not (tmp_path / "o").exists()


def test_source_that_does_not_exist(isolated: dict[str, str], tmp_path: Path) -> None:
    result = upstream("shard", "--source", f"imagefolder:{tmp_path / 'nope'}", "--output",
                      str(tmp_path / "o"), env=isolated)
    one_line_error(result, "nope")
    assert not (tmp_path / "o").exists()
    result = upstream("shard", "--source", "mnist-ish", "--output", str(tmp_path / "o"),
                      env=isolated)
    one_line_error(result, "mnist-ish")


def test_unreachable_s3_endpoint(isolated: dict[str, str]) -> None:
    env = {**isolated, "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "y"}
    result = upstream("shard", "--source", "digits", "--output", "s3://upstream/x", env=env)
    one_line_error(result, "127.0.0.1:9", "unreachable")


def test_k_larger_than_smallest_class(isolated: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert upstream("shard", "--source", "shapes", "--samples-per-class", "3", "--output",
                    str(out), env=isolated).returncode == 0
    result = upstream("finetune", "--pretrained", str(tmp_path / "missing"), "--data", str(out),
                      "--output", str(tmp_path / "ft"), "--shots", "5", env=isolated)
    one_line_error(result)
    assert "5" in result.stderr
    assert not (tmp_path / "ft").exists()


def test_run_needs_local_or_host(isolated: dict[str, str]) -> None:
    one_line_error(upstream("run", "transfer", env=isolated), "--local", "--host")


def test_run_rejects_bad_parameter_before_starting_services(isolated: dict[str, str]) -> None:
    result = upstream("run", "transfer", "--local", "--pretrain-lr", "-1", env=isolated)
    one_line_error(result, "lr")
    assert not (Path(isolated["UPSTREAM_HOME"]) / "services").exists()


@pytest.mark.parametrize("args, needle", [
    (["--pretrain-data-num-samples", "5000"], "only 2000 images"),
    (["--pretrain-data-classes", "fractal-99"], "fractal-99"),
    (["--downstream-kshot", "500"], "kshot=500"),
])
def test_run_checks_the_data_plan_before_starting_services(
    isolated: dict[str, str], args: list[str], needle: str
) -> None:
    result = upstream("run", "transfer", "--local", *args, env=isolated)
    one_line_error(result, needle)
    assert not (Path(isolated["UPSTREAM_HOME"]) / "services").exists()


def test_batch_larger_than_the_data(isolated: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "shards"
    assert upstream("shard", "--source", "shapes", "--samples-per-class", "2", "--output",
                    str(out), env=isolated).returncode == 0
    result = upstream("pretrain", "--data", str(out), "--output", str(tmp_path / "o"),
                      "--batch-size", "64", env=isolated)
    one_line_error(result, "batch_size 64", "16 samples")
    assert not (tmp_path / "o").exists()
