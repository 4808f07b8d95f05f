"""MLflow and S3 faults fail fast and leave nothing running (issue 12).

Drills against real servers and real processes: a TCP listener that accepts connections and
never answers (the pre-flight checks must answer in seconds), and a private ``upstream
services`` stack whose MLflow or SeaweedFS is SIGKILLed while a stage runs as a subprocess
(the stage must end within a bound, with one ``error:`` line naming the service, keep its
checkpoint, and leave no MLflow run RUNNING once the server is back).
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upstream import services, storage

SRC = Path(__file__).resolve().parent.parent / "src"
#: A dead service must end a stage within this (MLflow's default retries took ~250-530 s).
BOUND_S = 120.0
#: A pre-flight check must answer within this (a silent endpoint took ~604 s for S3).
PROBE_BOUND_S = 20.0
#: A stage whose MLflow is unreachable must stop within this, its imports included (MLflow's
#: default retries took 259 s against a refused port, 1219 s against a silent one).
STAGE_BOUND_S = 60.0
# Tiny runs: 100 digits at 16 px; steps of 10 with a state save every 2 steps.
PRETRAIN_ARGS = ["--method", "supervised", "--model", "upstream-tiny-rn", "--batch-size", "10",
                 "--checkpoint-every", "2", "--warmup-steps", "0", "--experiment", "faults"]
#: Enough steps that training goes on after the first state save (where the drills strike),
#: few enough to finish soon after on two busy cores.
STEPS_TO_FINISH = ["--train-samples", "200"]
#: Steps that never finish before the drill stops them.
ENDLESS = ["--train-samples", "1000000"]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port whose listener accepts every connection and never says a byte."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_", "AWS_", "UPSTREAM_"))}
    env.update(PYTHONPATH=str(SRC), **extra)
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "upstream", *args], env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)
    return proc.returncode, proc.stderr, time.monotonic() - t0


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# --- pre-flight checks: seconds, not minutes --------------------------------------------------


def _answers_within(check: Any, seconds: float) -> BaseException | None:
    """Run ``check`` in a thread; the exception it raised, or a failure if it takes longer
    than ``seconds`` (the thread is left to the socket's closing: a daemon)."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            check()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds:.0f} s"
    return raised[0] if raised else None


def test_s3_check_against_a_silent_endpoint_answers_in_seconds(
    silent_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from upstream.errors import UpstreamError

    endpoint = f"http://127.0.0.1:{silent_port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    storage._client.cache_clear()
    try:
        error = _answers_within(lambda: storage.check_reachable("s3://bucket/x"), PROBE_BOUND_S)
    finally:
        storage._client.cache_clear()
    assert isinstance(error, UpstreamError)
    assert str(error).startswith(f"S3 endpoint {endpoint} is unreachable")


def test_mlflow_check_against_a_silent_server_answers_in_seconds(silent_port: int) -> None:
    from upstream import tracking
    from upstream.errors import UpstreamError

    uri = f"http://127.0.0.1:{silent_port}"
    error = _answers_within(lambda: tracking.check_reachable(uri), PROBE_BOUND_S)
    assert isinstance(error, UpstreamError)
    assert str(error) == (f"MLflow tracking server {uri} is unreachable: no answer within "
                          f"{tracking.PROBE_TIMEOUT:.0f} s")


def test_stage_preflight_of_mlflow_answers_in_seconds(tmp_path: Path) -> None:
    """A stage against a tracking server that is not there stops before any compute, in
    seconds, with one line naming MLflow and its URI (a silent one: the probe test above)."""
    with socket.socket() as s:  # a port with nobody on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "shards"
    code, stderr, seconds = _cli(
        ["shard", "--source", "digits", "--samples-per-class", "2", "--image-size", "8",
         "--output", str(out)],
        _env(MLFLOW_TRACKING_URI=uri, UPSTREAM_HOME=str(tmp_path / "home")),
        timeout=STAGE_BOUND_S,
    )
    assert code == 2, stderr
    assert seconds < STAGE_BOUND_S, stderr
    assert _error_lines(stderr) == [_error_lines(stderr)[0]]
    assert f"MLflow tracking server {uri} is unreachable" in _error_lines(stderr)[0]
    assert "Traceback" not in stderr
    assert not (out / "manifest.json").exists()


# --- SIGTERM: the run ends KILLED -------------------------------------------------------------


def _statuses(db: Path) -> dict[str, str]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("select run_uuid, status from runs").fetchall())


def _wait_for(predicate: Any, timeout: float, proc: subprocess.Popen[str], what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the stage ended (code {proc.returncode}) before {what}:\n"
                                 + (proc.stderr.read() if proc.stderr else ""))
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    """100 digits at 16 px, sharded in this process (its MLflow run in a throwaway store)."""
    from upstream.shards.stage import ShardConfig, shard

    home = tmp_path_factory.mktemp("faults-digits")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPSTREAM_HOME", str(home))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        shard(ShardConfig.parse(source="digits", samples_per_class=10, image_size=16,
                                output=str(home / "digits"), experiment="faults"))
    return str(home / "digits")


def test_sigterm_ends_the_run_killed(digits: str, tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    env = _env(UPSTREAM_HOME=str(tmp_path / "home"), MLFLOW_TRACKING_URI=f"sqlite:///{db}")
    out = tmp_path / "pre"
    proc = subprocess.Popen([sys.executable, "-m", "upstream", "pretrain", "--data", digits,
                             "--output", str(out), *PRETRAIN_ARGS, *ENDLESS],
                            env=env, text=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    _wait_for(lambda: (out / "state" / "latest").exists(), 120, proc, "training state")
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 30
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert _error_lines(stderr) == ["error: interrupted by SIGTERM"]
    pretrain_runs = {r for r, in sqlite3.connect(db).execute(
        "select run_uuid from tags where key = 'upstream.stage' and value = 'pretrain'")}
    assert pretrain_runs
    assert {_statuses(db)[r] for r in pretrain_runs} == {"KILLED"}


# --- a private services stack whose servers die mid-stage ------------------------------------


class Stack:
    """A private S3 + MLflow pair, and a way to bring its MLflow back after killing it."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.info = services.up(home)
        self.env = services.env(self.info)
        mlflow_proc = __import__("psutil").Process(self.info.mlflow_pid)
        # What it takes to start the same MLflow again on the same port and database.
        self.mlflow_cmd = mlflow_proc.cmdline()
        self.mlflow_env = mlflow_proc.environ()
        self.restarted: subprocess.Popen[bytes] | None = None

    def kill(self, pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)

    def restart_mlflow(self) -> None:
        log = open(self.home / "mlflow-again.log", "wb")  # noqa: SIM115 - lives with the server
        self.restarted = subprocess.Popen(self.mlflow_cmd, env=self.mlflow_env, stdout=log,
                                          stderr=subprocess.STDOUT, cwd=self.info.services_dir,
                                          start_new_session=True)
        deadline = time.monotonic() + services.MLFLOW_START_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"{self.info.mlflow_uri}/health", timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline or self.restarted.poll() is not None:
                    raise AssertionError("MLflow did not come back") from None
                time.sleep(0.3)

    def close(self) -> None:
        if self.restarted is not None and self.restarted.poll() is None:
            os.killpg(self.restarted.pid, signal.SIGTERM)
            self.restarted.wait(30)
        services.down(self.home)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("faults-services"))
    try:
        yield s
    finally:
        s.close()


def _client(stack: Stack) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(stack.info.mlflow_uri)


def _stack_env(stack: Stack, tmp_path: Path) -> dict[str, str]:
    # UPSTREAM_HOME elsewhere: the CLI then finds no services of its own to check (which
    # would stop the S3 server on seeing the MLflow one dead) and uses these variables.
    return _env(UPSTREAM_HOME=str(tmp_path / "home"), **stack.env)


@pytest.mark.integration
def test_mlflow_killed_mid_pretrain(digits: str, stack: Stack, tmp_path: Path) -> None:
    """MLflow SIGKILLed while pretrain trains: the stage ends within the bound with one
    line naming MLflow, its checkpoint on S3 intact; once MLflow is back, the rerun logs what
    was missing to the same run, which ends FINISHED (nothing left RUNNING)."""
    env = _stack_env(stack, tmp_path)
    out = "s3://upstream/faults/pretrain"
    args = ["pretrain", "--data", digits, "--output", out, *PRETRAIN_ARGS, *STEPS_TO_FINISH]
    proc = subprocess.Popen([sys.executable, "-m", "upstream", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with pytest.MonkeyPatch.context() as mp:
        for k, v in stack.env.items():
            mp.setenv(k, v)
        storage._client.cache_clear()
        _wait_for(lambda: storage.exists(f"{out}/state/latest"), 120, proc, "training state")
        stack.kill(stack.info.mlflow_pid)
        t0 = time.monotonic()
        try:
            _, stderr = proc.communicate(timeout=BOUND_S + 60)
        finally:
            proc.kill()
        seconds = time.monotonic() - t0
        assert proc.returncode != 0, stderr
        assert seconds < BOUND_S, stderr
        errors = _error_lines(stderr)
        assert len(errors) == 1, stderr
        assert f"MLflow tracking server {stack.info.mlflow_uri}" in errors[0]
        assert storage.exists(f"{out}/checkpoint.pt")  # written before MLflow could block it
        storage._client.cache_clear()

    stack.restart_mlflow()
    client = _client(stack)
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.`upstream.stage` = 'pretrain'")
    assert [r.info.status for r in runs] == ["RUNNING"]  # the server died before its end
    code, stderr, _ = _cli(args, env, timeout=BOUND_S)
    assert code == 0, stderr
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert "final_loss" in run.data.metrics
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'")


def _finetune_lp(data: str, output: Path) -> list[str]:
    # Linear probes (seconds a cell) on the pretrain drill's checkpoint: three (k, seed)
    # groups, so that models are still to be logged when a service dies after the first.
    return ["finetune", "--data", data, "--pretrained", "s3://upstream/faults/pretrain",
            "--output", str(output), "--modes", "lp", "--shots", "2,3,4", "--seeds", "0",
            "--val-per-class", "2", "--probe-c-points", "4", "--experiment", "faults"]


def _start_until_a_cell(args: list[str], env: dict[str, str]) -> tuple[Any, list[str], Any]:
    proc = subprocess.Popen([sys.executable, "-m", "upstream", *args], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")),
                              daemon=True)
    reader.start()
    _wait_for(lambda: any("val top-1" in ln for ln in lines), 120, proc, "a finished cell")
    return proc, lines, reader


def _ends_in_one_line(proc: Any, lines: list[str], reader: Any) -> list[str]:
    """Wait for a stage whose service was just killed: it must fail within the bound, with
    one ``error:`` line (returned)."""
    t0 = time.monotonic()
    try:
        proc.wait(timeout=BOUND_S + 60)
    finally:
        proc.kill()
    reader.join(10)
    seconds = time.monotonic() - t0
    stderr = "".join(lines)
    assert proc.returncode != 0, stderr
    assert seconds < BOUND_S, stderr
    errors = _error_lines(stderr)
    assert len(errors) == 1, stderr
    return errors


@pytest.mark.integration
def test_mlflow_killed_mid_finetune(digits: str, stack: Stack, tmp_path: Path) -> None:
    """MLflow SIGKILLed while finetune runs its grid (before: ~500 s, 10 tracebacks, the runs
    RUNNING forever): one line naming MLflow within the bound; once MLflow is back, the next
    run of the same config closes the runs the dead process left RUNNING, and finishes."""
    env = _stack_env(stack, tmp_path)
    if stack.restarted is None:  # run alone: the pretrain drill did not leave MLflow restarted
        pytest.skip("needs the checkpoint of test_mlflow_killed_mid_pretrain")
    args = _finetune_lp(digits, tmp_path / "ft")
    proc, lines, reader = _start_until_a_cell(args, env)
    stack.kill(stack.restarted.pid)
    stack.restarted.wait(30)
    errors = _ends_in_one_line(proc, lines, reader)
    assert f"MLflow tracking server {stack.info.mlflow_uri}" in errors[0], errors[0]

    stack.restart_mlflow()
    client = _client(stack)
    experiment = client.get_experiment_by_name("faults")
    query = "tags.`upstream.stage` = 'finetune'"
    left = {r.info.status for r in client.search_runs([experiment.experiment_id], query)}
    assert "RUNNING" in left  # the server died before the grid could end its runs
    code, stderr, _ = _cli(args, env, timeout=BOUND_S)
    assert code == 0, stderr
    after = {r.info.status for r in client.search_runs([experiment.experiment_id], query)}
    assert "RUNNING" not in after, after


@pytest.mark.integration
def test_s3_killed_mid_finetune(digits: str, stack: Stack, tmp_path: Path) -> None:
    """SeaweedFS SIGKILLed while finetune runs (output and data local, so that S3 is reached
    through MLflow's artifact proxy): one line naming the service within the bound, and no
    run of the grid left RUNNING."""
    env = _stack_env(stack, tmp_path)
    if stack.restarted is None:  # run alone: the pretrain drill did not leave MLflow restarted
        pytest.skip("needs the checkpoint of test_mlflow_killed_mid_pretrain")
    proc, lines, reader = _start_until_a_cell(_finetune_lp(digits, tmp_path / "ft"), env)
    stack.kill(stack.info.s3_pid)
    errors = _ends_in_one_line(proc, lines, reader)
    assert "MLflow tracking server" in errors[0] or "S3 endpoint" in errors[0], errors[0]
    client = _client(stack)
    experiment = client.get_experiment_by_name("faults")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.`upstream.stage` = 'finetune'")
    assert runs
    assert "RUNNING" not in {r.info.status for r in runs}


# --- what the pieces say and do, without servers ----------------------------------------------


def test_service_faults_are_told_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import EndpointConnectionError
    from mlflow.exceptions import MlflowException

    from upstream import faults
    from upstream.errors import UpstreamError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:pw@127.0.0.1:5000")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8333")
    refused = MlflowException(
        "API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/log-batch failed with "
        "exception HTTPConnectionPool(host='127.0.0.1', port=5000): Max retries exceeded with "
        "url: ... (Caused by NewConnectionError(...: [Errno 111] Connection refused'))")
    assert faults.describe(refused) == ("MLflow tracking server http://127.0.0.1:5000 failed "
                                        "during the stage: connection refused")
    proxied = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow-artifacts/"
                              "artifacts/x failed with exception HTTPConnectionPool(...): Max "
                              "retries exceeded (Caused by ResponseError('too many 500 error "
                              "responses'))")
    assert faults.describe(proxied).endswith("answered HTTP 500 repeatedly (its artifact store "
                                             "may be down)")
    try:
        try:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:8333/b/k")
        except EndpointConnectionError as e:
            raise RuntimeError("upload failed") from e
    except RuntimeError as wrapped:
        assert faults.describe(wrapped) == ("S3 endpoint http://127.0.0.1:8333 failed during "
                                            "the stage: Could not connect to the endpoint URL: "
                                            "\"http://127.0.0.1:8333/b/k\"")
    # Answers are not faults, and a line that is one already stays as it is.
    assert faults.describe(MlflowException("API request to endpoint /x failed with error code "
                                           "404 != 200. Response body: ...")) is None
    assert faults.describe(UpstreamError("S3 bucket 'b' does not exist")) is None
    assert faults.describe(ValueError("bad")) is None


def test_client_retries_are_bounded_unless_set(monkeypatch: pytest.MonkeyPatch) -> None:
    from upstream import tracking

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")  # the user's: kept
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    tracking.bound_client_retries()
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 3
    assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 300


def test_runs_left_running_by_a_dead_process_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The next run of a config marks FAILED what a dead process of this host left RUNNING;
    a live owner's run, another host's and one without an owner are left alone."""
    from mlflow.tracking import MlflowClient

    from upstream import tracking
    from upstream.shards.stage import ShardConfig

    monkeypatch.setenv("UPSTREAM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = ShardConfig.parse(source="digits", output=str(tmp_path / "out"))
    experiment_id = tracking.ensure_experiment("faults")
    client = MlflowClient(tracking.tracking_uri())
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    owners = {"dead": f"{host}/{dead.pid}/1.00", "live": tracking.owner(),
              "elsewhere": f"another-host/{dead.pid}/1.00", "none": None}
    ids = {}
    for name, owner in owners.items():
        tags = {"upstream.fingerprint": config.fingerprint()}
        if owner:
            tags[tracking.OWNER_TAG] = owner
        ids[name] = client.create_run(experiment_id, tags=tags).info.run_id
    with tracking.stage_run(config, "faults") as run:
        pass
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {"dead": "FAILED", "live": "RUNNING", "elsewhere": "RUNNING",
                      "none": "RUNNING"}
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
