"""The command line: --help everywhere, and one-line errors for bad input before compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = [
    [], ["shard"], ["pretrain"], ["finetune"], ["corrupt"], ["evaluate"], ["report"],
    ["compile"], ["run"],
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


def test_grid_evaluation_and_report_from_the_command_line(
    isolated: dict[str, str], tmp_path: Path
) -> None:
    """A user's path through the stages: shards, a CLIP tower, an LP/zero-shot grid and its
    scratch baseline, a corruption suite, one evaluation of both grids, the report."""
    import json

    def ok(*args: str) -> dict:
        result = upstream(*args, env=isolated)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    train, test = str(tmp_path / "train"), str(tmp_path / "test")
    ok("shard", "--source", "digits", "--samples-per-class", "20", "--output", train)
    ok("shard", "--source", "digits", "--split", "test", "--samples-per-class", "6",
       "--output", test)
    ok("pretrain", "--data", train, "--output", str(tmp_path / "pt"), "--epochs", "1",
       "--batch-size", "32")
    grid = ok("finetune", "--pretrained", str(tmp_path / "pt"), "--data", train, "--output",
              str(tmp_path / "grid"), "--modes", "lp,zeroshot", "--shots", "2,5", "--seeds",
              "0,1", "--val-per-class", "4", "--probe-c-points", "4")
    assert grid["num_cells"] == 1 + 2 * 2 and grid["summary"]["val_top1 lp k=5"] >= 0
    ok("finetune", "--modes", "scratch", "--model", "upstream-tiny-rn", "--data", train,
       "--output", str(tmp_path / "scratch"), "--shots", "2,5", "--seeds", "0,1",
       "--val-per-class", "4", "--min-steps", "5")
    suite = ok("corrupt", "--data", test, "--output", str(tmp_path / "suite"),
               "--corruptions", "pixelate", "--severities", "3,5")
    assert suite["format"] == "upstream-corruption-suite"
    evaluated = ok("evaluate", "--model", f"{tmp_path / 'grid'},{tmp_path / 'scratch'}",
                   "--id-data", test, "--ood-data", str(tmp_path / "suite"))
    assert len(evaluated["models"]) == 5 + 4
    assert "ood_top1" in evaluated["models"][0]["summary"]
    # A few steps leave scratch at chance, maybe all at one ID accuracy: no line to fit here
    # (the end-to-end test draws one).
    made = ok("report", "--output", str(tmp_path / "report"), "--compare", "scratch",
              "--baseline", "none")
    assert made["models"] == 9 and (tmp_path / "report" / "report.html").exists()
