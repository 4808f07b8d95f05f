"""One writer per output (upstream.claims): real `upstream shard` and `upstream pretrain`
processes started together on one output, on the local S3 server (SeaweedFS) and on a local
folder; stale claims taken over; the fallback for stores without conditional writes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from upstream import claims, services, storage
from upstream.errors import UpstreamError
from upstream.shards.stage import ShardConfig, data_fingerprint, shard
from upstream.shards.writer import ShardCutter

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("local_services")]

#: 32 digits in 4 shards: the cheapest set the CLI makes (~1 s of work after the imports).
SHARD = {"source": "digits", "num_classes": 4, "samples_per_class": 8, "image_size": 32,
         "shard_size": 8, "workers": 1}
PRETRAIN = {"method": "supervised", "batch_size": 8, "train_samples": 32, "warmup_steps": 1,
            "deterministic": True, "checkpoint_every": 2}  # 4 steps, a state at step 2


def cli_args(stage: str, values: dict[str, Any]) -> list[str]:
    args = [sys.executable, "-m", "upstream", stage]
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False:
            args += [flag, str(v)]
    return args


@pytest.fixture
def place(tmp_path: Path) -> Iterator[Any]:
    """``place(store, name)``: a fresh output location on the local S3 server or in tmp_path."""
    made: list[str] = []

    def make(store: str, name: str) -> str:
        if store == "local":
            return str(tmp_path / name)
        uri = f"{services.DATA_ROOT}/claims-test/{uuid.uuid4().hex[:8]}/{name}"
        made.append(uri)
        return uri

    yield make
    for uri in made:
        storage.remove(uri)


def files(output: str) -> dict[str, bytes]:
    base = output.rstrip("/") + "/"
    return {u[len(base):]: storage.read_bytes(u) for u in storage.list_files(output)}


def same_set(output: str, reference: str) -> None:
    """The shard set at ``output`` is byte for byte the one at ``reference`` (the manifest
    differs only in where it says the set is)."""
    got, want = files(output), files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        if name == "manifest.json":
            a, b = json.loads(got[name]), json.loads(want[name])
            for m in (a, b):
                m.pop("uri")
                m["config"].pop("output")
            assert a == b
        else:
            assert got[name] == want[name], name


# --- racing processes -----------------------------------------------------------------------


def race(commands: dict[str, list[str]], output: str, logs: Path) -> dict[str, Any]:
    """Start ``commands`` together; freeze the one that takes the claim on ``output`` until
    every other one has decided (exited, or logged that it waits), so that they all meet a
    live claim however fast the winner is; then let it finish. Returns the winner's name
    and each command's exit code and stderr."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {
        name: subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                               stderr=open(logs / f"{name}.err", "wb"))  # noqa: SIM115
        for name, cmd in commands.items()
    }
    store = claims._store(claims.claim_uri(output))
    winner: str | None = None
    try:
        # Generous: three processes importing torch and MLflow on two busy cores.
        deadline = time.monotonic() + 600
        while winner is None and time.monotonic() < deadline:
            seen = store.read()
            owner = seen.owner if seen is not None else None
            by_pid = {p.pid: n for n, p in procs.items()}
            if owner is not None and owner.pid in by_pid:
                winner = by_pid[owner.pid]
                os.kill(owner.pid, signal.SIGSTOP)
            elif all(p.poll() is not None for p in procs.values()):
                break
            else:
                time.sleep(0.02)
        assert winner is not None, "no process claimed the output: " + "; ".join(
            f"{n}: {(logs / f'{n}.err').read_text()[-500:]}" for n in procs)

        def decided(name: str) -> bool:
            return (procs[name].poll() is not None
                    or b"waiting for" in (logs / f"{name}.err").read_bytes())

        while not all(decided(n) for n in procs if n != winner):
            assert time.monotonic() < deadline, "the others neither exited nor waited"
            time.sleep(0.05)
        os.kill(procs[winner].pid, signal.SIGCONT)
        for p in procs.values():
            p.wait(timeout=600)
    finally:
        for p in procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait()
    return {"winner": winner, "pids": {n: p.pid for n, p in procs.items()},
            **{n: (p.returncode, (logs / f"{n}.err").read_text()) for n, p in procs.items()}}


def refused_in_one_line(stderr: str, holder_pid: int, fingerprint: str) -> None:
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert "is being written by another config" in errors[0]
    assert f"pid {holder_pid}" in errors[0] and fingerprint in errors[0], errors[0]


def only_the_winners_config_ran(result: dict[str, Any], fps: dict[str, str]) -> str:
    """The race's winner; every racer of its config exited 0, every other one was refused in
    one line naming the winner."""
    winner = result["winner"]
    for name, fp in fps.items():
        code, stderr = result[name]
        if fp == fps[winner]:
            assert code == 0, stderr[-2000:]
        else:
            assert code == 2, stderr[-2000:]
            refused_in_one_line(stderr, result["pids"][winner], fps[winner])
    return winner


@pytest.mark.parametrize("store", ["s3", "local"])
def test_shard_one_writer_per_output(store: str, place: Any, tmp_path: Path) -> None:
    """Two configs (on S3 also a second copy of one) started together on one output: one
    config writes, the other is refused naming the holder, the copy waits and reuses the
    set. (Before claims: all exited 0, over one set; locally they shared part files.)"""
    output = place(store, "set")
    configs = {"a": SHARD, "b": {**SHARD, "shard_size": 4}}
    if store == "s3":  # the waiting is the same code for both stores: tested once
        configs["a-again"] = {**SHARD, "workers": 2}  # workers do not change the set
    fps = {n: data_fingerprint(ShardConfig.parse(**v, output=output)) for n, v in configs.items()}
    assert fps["a"] == fps.get("a-again", fps["a"]) != fps["b"]
    result = race({n: cli_args("shard", {**v, "output": output}) for n, v in configs.items()},
                  output, tmp_path / "logs")
    winner = only_the_winners_config_ran(result, fps)
    reference = str(tmp_path / "lone")
    shard(ShardConfig.parse(**configs[winner], output=reference))
    same_set(output, reference)


@pytest.mark.parametrize("store", ["s3"])
def test_pretrain_one_writer_per_output(store: str, place: Any, tmp_path: Path,
                                        digits_set: str) -> None:
    """Two configs (seed 0 and 1: the cheapest difference) and a copy of the first started
    together on one output: one writes its checkpoint, state and one registered model, the
    other config is refused in one line naming the holder, a copy of the winner waits and
    returns its result. (Before claims: all exited 0, each registered a model, and state/
    mixed their saves.)"""
    import mlflow
    import torch

    from upstream import models
    from upstream.pretrain.stage import PretrainConfig, pretrain

    output = place(store, "pt")
    experiment = f"claims-{uuid.uuid4().hex[:8]}"
    base = {**PRETRAIN, "data": digits_set, "experiment": experiment}
    configs = {"seed0": base, "seed1": {**base, "seed": 1}, "seed0-again": base}
    fps = {n: PretrainConfig.parse(**v, output=output).fingerprint() for n, v in configs.items()}
    result = race({n: cli_args("pretrain", {**v, "output": output})
                   for n, v in configs.items()}, output, tmp_path / "logs")
    winner = only_the_winners_config_ran(result, fps)
    method = configs[winner]["method"]
    names = sorted(files(output))
    assert names == ["checkpoint.pt", "state/latest", "state/step-00000002.pt"], names
    lone = pretrain(PretrainConfig.parse(**{**configs[winner], "experiment": experiment + "-lone"},
                                         output=str(tmp_path / "lone")))
    got, want = (models.load_checkpoint(u) for u in (output, lone["checkpoint"]))
    assert got["method"] == want["method"] == method
    assert got["visual"].keys() == want["visual"].keys()
    assert all(torch.equal(got["visual"][k], want["visual"][k]) for k in want["visual"])
    # One model registered for the output, by the one writer.
    name = f"{experiment}-digits-{method}"
    assert len(mlflow.MlflowClient().search_model_versions(f"name='{name}'")) == 1


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory: pytest.TempPathFactory, local_services: Any) -> str:
    out = tmp_path_factory.mktemp("digits") / "set"
    shard(ShardConfig.parse(**SHARD, output=str(out)))
    return str(out)


# --- stale and live claims, in process ------------------------------------------------------


def write_claim(output: str, *, host: str, pid: int, started: float, fingerprint: str,
                ttl_s: float) -> str:
    uri = claims.claim_uri(output)
    body = json.dumps({"format": 1, "stage": "shard", "fingerprint": fingerprint, "ttl_s": ttl_s,
                       "owner": {"host": host, "pid": pid, "started": started,
                                 "token": "f00d"}}).encode()
    storage.write_bytes(uri, body)
    return uri


@pytest.mark.parametrize("store", ["s3", "local"])
def test_expired_claim_of_another_host_is_taken_over(store: str, place: Any) -> None:
    output = place(store, "set")
    uri = write_claim(output, host="elsewhere", pid=1, started=0.0, fingerprint="other",
                      ttl_s=0)
    if store == "local":
        os.utime(uri, (time.time() - 5, time.time() - 5))
    else:
        time.sleep(1.1)  # S3 dates have a resolution of one second
    m = shard(ShardConfig.parse(**SHARD, output=output))
    assert len(m["shards"]) == 4
    assert not storage.exists(uri)


def test_claim_of_a_dead_process_on_this_host_is_taken_over(place: Any) -> None:
    import psutil

    output = place("local", "set")
    gone = subprocess.Popen(["true"])
    started = psutil.Process(gone.pid).create_time() if psutil.pid_exists(gone.pid) else 0.0
    gone.wait()
    uri = write_claim(output, host=socket.gethostname(), pid=gone.pid, started=started,
                      fingerprint="other", ttl_s=3600)
    shard(ShardConfig.parse(**SHARD, output=output))
    assert not storage.exists(uri)


@pytest.mark.parametrize("store", ["s3", "local"])
def test_live_claim_of_another_config_refuses_before_any_work(store: str, place: Any) -> None:
    output = place(store, "set")
    uri = write_claim(output, host="elsewhere", pid=4242, started=0.0,
                      fingerprint="0123456789abcdef", ttl_s=3600)
    t0 = time.monotonic()
    with pytest.raises(UpstreamError) as e:
        shard(ShardConfig.parse(**SHARD, output=output))
    assert time.monotonic() - t0 < 5
    line = str(e.value)
    assert "\n" not in line and "elsewhere pid 4242" in line and "0123456789abcdef" in line
    assert [u.rsplit("/", 1)[1] for u in storage.list_files(output)] == [claims.CLAIM_FILE]
    assert storage.exists(uri)


def test_a_writer_whose_claim_was_taken_stops(place: Any) -> None:
    output = place("local", "out")
    held = claims.acquire(output, "fp", "shard", ttl=0.2)
    held._stop.set()  # the heartbeat stops, as in a frozen process
    held._thread.join()
    # Meanwhile a writer on another host found it expired and took it over.
    uri = claims.claim_uri(output)
    foreign = write_claim(output + "-elsewhere", host="elsewhere", pid=1, started=0.0,
                          fingerprint="other", ttl_s=60)
    os.replace(foreign, uri)
    time.sleep(0.15)
    with pytest.raises(UpstreamError, match="lost the claim .*replaced by shard config other"):
        held.check()
    held.release()  # leaves the new holder's claim alone
    assert claims._store(uri).read().owner.host == "elsewhere"


def test_processes_started_under_a_claim_check_it(place: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    output = place("s3", "pt")
    with claims.claimed(output, "fp", "pretrain") as held:
        for k, v in held.env().items():
            monkeypatch.setenv(k, v)
        with claims.claimed(output, "fp", "pretrain") as child:  # torchrun's rank 0
            assert isinstance(child, claims._Inherited)
            child.check()
        monkeypatch.delenv(claims.INHERITED_ENV)
    monkeypatch.setenv(claims.INHERITED_ENV, f"{held.token} {claims.claim_uri(output)}")
    with claims.claimed(output, "fp", "pretrain") as child, pytest.raises(UpstreamError):
        child.check()


# --- a store without conditional writes -----------------------------------------------------


def test_fallback_without_conditional_writes(place: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """SeaweedFS honours If-None-Match and If-Match; a store that ignores them is this same
    server with the headers taken off every request (what this machine cannot run as is).
    Writers then read their claim back after SETTLE_S: of two at once, one holds it."""
    real = claims._client.__wrapped__

    def unconditional(*args: Any) -> Any:
        client = real(*args)

        def strip(request: Any, **_: Any) -> None:
            for h in ("If-None-Match", "If-Match"):
                if h in request.headers:
                    del request.headers[h]

        client.meta.events.register("before-sign.s3", strip)
        return client

    monkeypatch.setattr(claims, "_client", unconditional)
    monkeypatch.setattr(claims, "_conditional", {})
    monkeypatch.setattr(claims, "SETTLE_S", 0.5)
    output = place("s3", "out")
    outcomes: dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def take(fp: str) -> None:
        barrier.wait()
        try:
            outcomes[fp] = claims.acquire(output, fp, "shard")
        except UpstreamError as e:
            outcomes[fp] = e

    threads = [threading.Thread(target=take, args=(fp,)) for fp in ("one", "two")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    held = [c for c in outcomes.values() if isinstance(c, claims.Claim)]
    assert len(held) == 1, outcomes
    assert claims._conditional == {(storage.endpoint_url(), "upstream"): False}
    refused = [e for e in outcomes.values() if isinstance(e, UpstreamError)]
    assert len(refused) == 1 and held[0].fingerprint in str(refused[0])
    held[0].release()
    assert not storage.exists(claims.claim_uri(output))


def test_part_files_are_unique_per_writer(tmp_path: Path) -> None:
    cutters = [ShardCutter(tmp_path, 0, 0, 6, 4, 0, finished=lambda s: None) for _ in range(2)]
    assert cutters[0]._path != cutters[1]._path
    assert cutters[0]._path.name.startswith(".shard-000000.tar.")
