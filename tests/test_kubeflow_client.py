"""`upstream upload` and `upstream submit` through the real kfp.Client, over HTTP.

No Kubeflow Pipelines backend can run on this machine, so the backend here is a stand-in: an
``http.server`` on 127.0.0.1 (port 0, in a thread) that implements just enough of the KFP
v2beta1 REST API for kfp.Client 2.17 (healthz, list/upload pipelines, upload_version, list
versions, list/create experiments, create runs), records every request (method, path, query,
headers, body) and answers with plausible JSON. The tests check what upstream makes the real
client send; they say nothing about how a real backend then runs the pipeline.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from kfp import dsl

from upstream.components.factory import Param, define
from upstream.errors import UpstreamError
from upstream.pipelines import kubeflow, registry, transfer

TOKEN = "kfp-test-token-3f9c1e"
REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "compiled" / "transfer.yaml"


# --- the stand-in -----------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def arg(self, name: str) -> str | None:
        return self.query.get(name, [None])[0]

    def uploaded_file(self) -> tuple[str, bytes]:
        """(filename, content) of the multipart field ``uploadfile``."""
        head = f"Content-Type: {self.headers['content-type']}\r\n\r\n".encode()
        message = BytesParser().parsebytes(head + self.body)
        for part in message.get_payload():
            if part.get_param("name", header="content-disposition") == "uploadfile":
                return part.get_filename(), part.get_payload(decode=True)
        raise AssertionError("no uploadfile field in the upload request")


class StandIn:
    """A Kubeflow Pipelines v2beta1 API stand-in that keeps its state in dicts."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.required_token: str | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self.command, url.path, parse_qs(url.query),
                                  {k.lower(): v for k, v in self.headers.items()},
                                  self.rfile.read(length) if length else b"")
                with standin._lock:
                    standin.requests.append(request)
                    status, payload = standin.answer(request)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def _stamp(self) -> str:
        # Increasing timestamps, so that "created_at desc" has an order.
        return f"2026-12-01T00:00:{next(self._ids) % 60:02d}Z"

    @staticmethod
    def _filtered(items: list[dict[str, Any]], request: Request) -> list[dict[str, Any]]:
        text = request.arg("filter")
        if not text:
            return items
        for p in json.loads(text)["predicates"]:
            assert p["key"] == "display_name" and p["operation"] in ("EQUALS", 1), p
            items = [i for i in items if i["display_name"] == p["stringValue"]]
        return items

    @staticmethod
    def _error(status: int, code: int, message: str) -> tuple[int, dict[str, Any]]:
        return status, {"error": message, "code": code, "message": message}

    def answer(self, r: Request) -> tuple[int, dict[str, Any]]:
        wanted = f"Bearer {self.required_token}"
        if self.required_token and r.headers.get("authorization") != wanted:
            return self._error(401, 16, "Unauthenticated: no valid token")
        route = (r.method, r.path)
        if route == ("GET", "/apis/v2beta1/healthz"):
            return 200, {"multi_user": False, "pipeline_store": "database"}
        if route == ("GET", "/apis/v2beta1/pipelines"):
            found = self._filtered(list(self.pipelines.values()), r)
            return 200, ({"pipelines": found, "total_size": len(found)} if found else {})
        if route == ("POST", "/apis/v2beta1/pipelines/upload"):
            name = r.arg("display_name") or r.arg("name")
            if any(p["display_name"] == name for p in self.pipelines.values()):
                return self._error(409, 6, f"pipeline {name} already exists")
            pid = self._id("pipeline")
            pipeline = {"pipeline_id": pid, "display_name": name, "name": name,
                        "description": r.arg("description"), "created_at": self._stamp()}
            self.pipelines[pid] = pipeline
            # Like the real backend: the first version is named after the pipeline.
            self.versions[pid] = [{"pipeline_id": pid, "pipeline_version_id": self._id("version"),
                                   "display_name": name, "created_at": self._stamp()}]
            return 200, pipeline
        if route == ("POST", "/apis/v2beta1/pipelines/upload_version"):
            pid, name = r.arg("pipelineid"), r.arg("name")
            if pid not in self.pipelines:
                return self._error(404, 5, f"pipeline {pid} not found")
            if any(v["display_name"] == name for v in self.versions[pid]):
                return self._error(409, 6, f"version {name} already exists")
            version = {"pipeline_id": pid, "pipeline_version_id": self._id("version"),
                       "display_name": name, "created_at": self._stamp()}
            self.versions[pid].append(version)
            return 200, version
        parts = r.path.split("/")
        if r.method == "GET" and r.path.startswith("/apis/v2beta1/pipelines/") \
                and len(parts) == 6 and parts[5] == "versions":
            pid = parts[4]
            found = self._filtered(self.versions.get(pid, []), r)
            if r.arg("sort_by") == "created_at desc":
                found = sorted(found, key=lambda v: v["created_at"], reverse=True)
            found = found[: int(r.arg("page_size") or 10)]
            return 200, ({"pipeline_versions": found, "total_size": len(found)} if found else {})
        if route == ("GET", "/apis/v2beta1/experiments"):
            found = self._filtered(list(self.experiments.values()), r)
            return 200, ({"experiments": found, "total_size": len(found)} if found else {})
        if route == ("POST", "/apis/v2beta1/experiments"):
            body = r.json()
            eid = self._id("experiment")
            self.experiments[eid] = {**body, "experiment_id": eid, "created_at": self._stamp(),
                                     "storage_state": "AVAILABLE"}
            return 200, self.experiments[eid]
        if route == ("POST", "/apis/v2beta1/runs"):
            body = r.json()
            rid = self._id("run")
            self.runs[rid] = {**body, "run_id": rid, "state": "PENDING",
                              "created_at": self._stamp(), "storage_state": "AVAILABLE"}
            return 200, self.runs[rid]
        return self._error(404, 5, f"the stand-in has no route {r.method} {r.path}")

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path}" for r in self.requests]


@pytest.fixture
def standin() -> Iterator[StandIn]:
    backend = StandIn()
    thread = threading.Thread(target=backend.server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield backend
    finally:
        backend.server.shutdown()
        backend.server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def kfp_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """The token in the environment, and nothing of this machine's kfp settings."""
    import kfp.client.client as kfp_client

    monkeypatch.setenv(kubeflow.TOKEN_ENV, TOKEN)
    for key in (kubeflow.TOKEN_PATH_ENV, "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_ENDPOINT",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME"):
        monkeypatch.delenv(key, raising=False)
    # A developer's ~/.config/kfp/context.json (namespace, cookies) must not leak in.
    monkeypatch.setattr(kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "context.json"))
    monkeypatch.setattr(kubeflow, "DEFAULT_TOKEN_PATH", str(tmp_path / "no-token"))
    return {"HOME": str(tmp_path), kubeflow.TOKEN_ENV: TOKEN,
            "UPSTREAM_HOME": str(tmp_path / "upstream-home")}


def upstream(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KF_PIPELINES_")}
    return subprocess.run([sys.executable, "-m", "upstream", *args], capture_output=True,
                          text=True, env={**environ, **env}, timeout=120)


@pytest.fixture(scope="module")
def cli() -> Any:
    """The command line in this process (each subprocess would spend seconds importing)."""
    from typer.testing import CliRunner

    from upstream.cli import app

    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def one_line_error(result: Any, *needles: str) -> str:
    code = getattr(result, "returncode", getattr(result, "exit_code", None))
    assert code == 2, (code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- upload -----------------------------------------------------------------------------------


def test_upload_sends_the_compiled_yaml(standin: StandIn) -> None:
    result = kubeflow.upload("transfer", standin.url)

    (pid,) = standin.pipelines
    assert result["pipeline_id"] == pid
    assert result["version_id"] == standin.versions[pid][0]["pipeline_version_id"]
    assert result["action"] == "created pipeline"
    vid = result["version_id"]
    assert result["url"] == f"{standin.url}/#/pipelines/details/{pid}/version/{vid}"
    assert standin.paths() == [
        "GET /apis/v2beta1/healthz",  # upstream's fast probe
        "GET /apis/v2beta1/healthz",  # kfp.Client's constructor
        "GET /apis/v2beta1/pipelines",
        "POST /apis/v2beta1/pipelines/upload",
        f"GET /apis/v2beta1/pipelines/{pid}/versions",
    ]
    upload = standin.requests[3]
    assert upload.arg("name") == "transfer"
    filename, content = upload.uploaded_file()
    assert filename.endswith(".yaml")
    assert content == COMPILED.read_bytes()


def test_a_second_upload_adds_a_version_and_a_third_changes_nothing(standin: StandIn) -> None:
    first = kubeflow.upload("transfer", standin.url)
    second = kubeflow.upload("transfer", standin.url)

    expected = "transfer-" + hashlib.sha256(COMPILED.read_bytes()).hexdigest()[:12]
    assert second["action"] == "added version"
    assert second["pipeline_id"] == first["pipeline_id"]
    assert second["version"] == expected
    assert second["version_id"] != first["version_id"]
    (add,) = [r for r in standin.requests if r.path.endswith("/upload_version")]
    assert add.arg("name") == expected
    assert add.arg("pipelineid") == first["pipeline_id"]
    assert add.uploaded_file()[1] == COMPILED.read_bytes()

    posts = sum(r.method == "POST" for r in standin.requests)
    third = kubeflow.upload("transfer", standin.url)
    assert third["version_id"] == second["version_id"]
    assert third["action"].startswith("unchanged")
    assert sum(r.method == "POST" for r in standin.requests) == posts

    named = kubeflow.upload("transfer", standin.url, version="v2")
    assert named["version"] == "v2" and named["action"] == "added version"
    with pytest.raises(UpstreamError, match="already has a version named 'v2'"):
        kubeflow.upload("transfer", standin.url, version="v2")


def test_upload_from_the_command_line(standin: StandIn, kfp_env: dict[str, str]) -> None:
    result = upstream("upload", "transfer", "--host", standin.url + "/", env=kfp_env)
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert printed["pipeline_id"] in standin.pipelines
    assert printed["version_id"]
    assert TOKEN not in result.stdout + result.stderr
    assert all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in standin.requests)


# --- submit -----------------------------------------------------------------------------------


def test_submit_sends_typed_parameters_and_the_token(standin: StandIn) -> None:
    result = kubeflow.submit("transfer", standin.url, [
        "finetune_epochs=2", "pretrain_lr=0.01", "pretrain_compile=true",
        "downstream-source=digits", "experiment=study-a",
    ])

    (rid,) = standin.runs
    run = standin.runs[rid]
    parameters = run["runtime_config"]["parameters"]
    assert parameters == {"finetune_epochs": 2, "pretrain_lr": 0.01, "pretrain_compile": True,
                          "downstream_source": "digits", "experiment": "study-a"}
    assert type(parameters["finetune_epochs"]) is int
    assert type(parameters["pretrain_lr"]) is float
    # The run carries the checked-in compiled pipeline inline, its Kubernetes settings too.
    pipeline_spec = run["pipeline_spec"]["pipeline_spec"]
    assert pipeline_spec["pipelineInfo"]["name"] == "transfer"
    compiled = next(yaml.safe_load_all(COMPILED.read_text()))
    assert pipeline_spec["root"]["inputDefinitions"]["parameters"].keys() == \
        compiled["root"]["inputDefinitions"]["parameters"].keys()
    assert "platform_spec" in run["pipeline_spec"]
    (eid,) = standin.experiments
    assert standin.experiments[eid]["display_name"] == "study-a"  # from the experiment param
    assert run["experiment_id"] == eid
    assert result["run_id"] == rid and result["experiment_id"] == eid
    assert result["url"] == f"{standin.url}/#/runs/details/{rid}"
    assert standin.requests and all(
        r.headers.get("authorization") == f"Bearer {TOKEN}" for r in standin.requests)
    assert TOKEN not in json.dumps(result)


def test_submit_files_the_run_under_the_experiment_asked_for(standin: StandIn) -> None:
    kubeflow.submit("transfer", standin.url, ["finetune_seeds=0,1"], experiment="nightly")
    kubeflow.submit("transfer", standin.url, [], experiment="nightly")

    (experiment,) = standin.experiments.values()  # created once, then found by name
    assert experiment["display_name"] == "nightly"
    first, second = standin.runs.values()
    assert first["runtime_config"]["parameters"] == {"finetune_seeds": "0,1"}
    assert second["runtime_config"]["parameters"] == {}


@pytest.mark.parametrize("pair, needle", [
    ("nope=1", "unknown parameter 'nope' of pipeline transfer"),
    ("finetune_epoch=2", "did you mean finetune_epochs"),
    ("finetune_epochs=two", "finetune_epochs=two: expected an integer"),
    ("pretrain_compile=maybe", "expected true or false"),
    ("pretrain_lr=nan", "expected a finite number"),
    ("pretrain_lr", "NAME=VALUE"),
    ("finetune_shots=-1", "invalid shots"),  # the stage config's own validation
])
def test_a_bad_param_is_refused_before_any_request(
    standin: StandIn, pair: str, needle: str
) -> None:
    with pytest.raises(UpstreamError, match=needle.replace("(", r"\(")):
        kubeflow.submit("transfer", standin.url, [pair])
    assert standin.requests == []


def test_a_bad_param_on_the_command_line(standin: StandIn, cli: Any) -> None:
    result = cli("submit", "transfer", "--host", standin.url, "--param", "finetune_epochs=x")
    one_line_error(result, "finetune_epochs=x", "integer")
    result = cli("submit", "transfer", "--host", standin.url, "--param", "finetune_epochs=2",
                 "--param", "finetune-epochs=3")
    one_line_error(result, "finetune_epochs is given twice")
    assert standin.requests == []


def test_a_parameter_missing_from_a_stale_compiled_yaml_is_refused(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import upstream.compile

    docs = list(yaml.safe_load_all(COMPILED.read_text()))
    del docs[0]["root"]["inputDefinitions"]["parameters"]["report_seed"]
    (tmp_path / "transfer.yaml").write_text(yaml.safe_dump_all(docs))
    monkeypatch.setattr(upstream.compile, "default_output_dir", lambda: tmp_path)
    with pytest.raises(UpstreamError, match="has no parameter report_seed.*upstream compile"):
        kubeflow.submit("transfer", standin.url, ["report_seed=1"])
    assert standin.requests == []


def test_spec_is_refused_for_a_pipeline_without_a_spec_parameter(
    standin: StandIn, cli: Any, tmp_path: Path
) -> None:
    spec = tmp_path / "study.yaml"
    spec.write_text("name: a\n")
    with pytest.raises(UpstreamError, match="pipeline transfer has no 'spec' parameter"):
        kubeflow.submit("transfer", standin.url, [], spec_file=spec)
    result = cli("submit", "transfer", "--host", standin.url, "--spec", str(spec))
    one_line_error(result, "no 'spec' parameter")
    assert standin.requests == []


# Defined from source because kfp needs real annotations, not this module's postponed ones.
tiny_study = define('''
@dsl.component(base_image="python:3.11-slim")
def read_spec(spec: str, seeds: int) -> str:
    return f"{len(spec)} {seeds}"


@dsl.pipeline(name="tiny-study", description="A pipeline with a spec parameter.")
def tiny_study(spec: str = "", seeds: int = 1):
    read_spec(spec=spec, seeds=seeds)
''', "tiny_study", {"dsl": dsl})


@pytest.fixture
def with_tiny_study(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``tiny-study`` registered beside transfer; its validations recorded."""
    checked: list[dict[str, Any]] = []
    params = [Param("spec", str, "", "The study spec (YAML text)."),
              Param("seeds", int, 1, "Seeds per cell.")]
    real_stage_configs = registry.stage_configs

    def stage_configs(name: str, values: dict[str, Any]) -> list[Any]:
        if name == "tiny-study":
            checked.append(dict(values))
            return []
        return real_stage_configs(name, values)

    monkeypatch.setattr(registry, "pipelines", lambda: {
        "transfer": (transfer.transfer, transfer.PARAMS), "tiny-study": (tiny_study, params)})
    monkeypatch.setattr(registry, "stage_configs", stage_configs)
    return checked


def test_spec_text_becomes_the_spec_parameter(
    standin: StandIn, with_tiny_study: list[dict[str, Any]], tmp_path: Path
) -> None:
    text = "# a study\nname: entezari-mini\ncells:\n  - {source: fractals, shots: [1, 5]}\n"
    spec = tmp_path / "study.yaml"
    spec.write_text(text)

    result = kubeflow.submit("tiny-study", standin.url, ["seeds=3"], spec_file=spec)

    (run,) = standin.runs.values()
    assert run["runtime_config"]["parameters"] == {"spec": text, "seeds": 3}
    assert run["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-study"
    assert result["yaml"] == "compiled in memory"  # no checked-in YAML for it
    assert with_tiny_study == [{"spec": text, "seeds": 3}]  # validated before sending

    with pytest.raises(UpstreamError, match="not both"):
        kubeflow.submit("tiny-study", standin.url, ["spec=x"], spec_file=spec)
    with pytest.raises(UpstreamError, match="does not exist"):
        kubeflow.submit("tiny-study", standin.url, [], spec_file=tmp_path / "missing.yaml")
    assert len(standin.runs) == 1


# --- the token and the host -------------------------------------------------------------------


def test_the_token_can_come_from_a_file(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-77\n")
    monkeypatch.delenv(kubeflow.TOKEN_ENV)
    monkeypatch.setenv(kubeflow.TOKEN_PATH_ENV, str(token_file))
    kubeflow.upload("transfer", standin.url)
    assert all(r.headers["authorization"] == "Bearer file-token-77" for r in standin.requests)


def test_a_backend_that_wants_a_token_says_so(
    standin: StandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    standin.required_token = TOKEN
    monkeypatch.delenv(kubeflow.TOKEN_ENV)
    with pytest.raises(UpstreamError, match=f"HTTP 401.*set {kubeflow.TOKEN_ENV}"):
        kubeflow.upload("transfer", standin.url)
    monkeypatch.setenv(kubeflow.TOKEN_ENV, "wrong")
    with pytest.raises(UpstreamError, match="the token was refused"):
        kubeflow.upload("transfer", standin.url)
    assert len(standin.requests) == 2  # one probe each, nothing after


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_host_fails_fast_in_one_line(kfp_env: dict[str, str], cli: Any) -> None:
    host = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    result = upstream("upload", "transfer", "--host", host, env=kfp_env)
    elapsed = time.monotonic() - t0
    one_line_error(result, f"cannot reach Kubeflow Pipelines at {host}", "Connection refused")
    assert elapsed < 30, elapsed  # the CLI's start-up included; kfp alone retries for ~25 s
    t0 = time.monotonic()
    result = cli("submit", "transfer", "--host", host, "--param", "finetune_epochs=1")
    one_line_error(result, f"cannot reach Kubeflow Pipelines at {host}")
    assert time.monotonic() - t0 < 5


def test_a_host_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kubeflow, "PROBE_TIMEOUT_S", 0.5)
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(UpstreamError, match=rf"at {host}: no answer within 0.5 s"):
            kubeflow.upload("transfer", host)
        assert time.monotonic() - t0 < 5


def test_a_wrong_url_is_named(standin: StandIn) -> None:
    with pytest.raises(UpstreamError, match="has no Kubeflow Pipelines v2beta1 API"):
        kubeflow.upload("transfer", standin.url + "/not-the-api")


# --- small parts ------------------------------------------------------------------------------


def test_values_are_parsed_to_the_declared_type() -> None:
    assert kubeflow.parse_value("a", list, '["x", 1]') == ["x", 1]
    assert kubeflow.parse_value("a", dict, '{"k": 2}') == {"k": 2}
    assert kubeflow.parse_value("a", bool, "No") is False
    assert kubeflow.parse_value("a", str, " keep spaces ") == " keep spaces "
    with pytest.raises(UpstreamError, match="expected a JSON list"):
        kubeflow.parse_value("a", list, '{"k": 2}')
    assert kubeflow.normalize_host("kfp.example/") == "https://kfp.example"


def test_help_names_the_token_variable(cli: Any) -> None:
    for command in ("upload", "submit"):
        result = cli(command, "--help")
        assert result.exit_code == 0, result.output
        assert "KF_PIPELINES_TOKEN" in " ".join(result.stdout.split())
