"""MLflow for every stage: one run per stage call, with the whole config as params.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` (the local services or a cluster's MLflow
server set it). Without it, runs go to a SQLite store under ``$UPSTREAM_HOME`` (default
``~/.upstream``) so that a stage called on its own still records what it did.

Faults: every stage probes the tracking server first (:func:`check_reachable`: one request,
short timeouts, no retries), and MLflow's client retries are bounded
(:data:`CLIENT_DEFAULTS`, unless the environment sets them), so a dead server ends a stage in
seconds with one line naming it. A run ends FINISHED, FAILED (an exception) or KILLED
(SIGTERM, SIGINT); a run whose process died without ending it (SIGKILL, or the server was
down at the end) is closed by the next run of the same config on the same host, which finds
it by its ``upstream.owner`` tag (host, pid and process start time).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from upstream import __version__
from upstream.config import StageConfig
from upstream.errors import Interrupted, UpstreamError

log = logging.getLogger(__name__)

#: Packages whose versions every run records, so that it can be reproduced.
RECORDED_PACKAGES = ("torch", "torchvision", "open-clip-torch", "webdataset", "kfp", "mlflow")
#: Environment variable a pipeline sets so that the runs of its stages can be grouped.
GROUP_ENV = "UPSTREAM_RUN_GROUP"
#: Tag naming the process that holds a run open: ``host/pid/start time``.
OWNER_TAG = "upstream.owner"

#: MLflow's client settings (read by MLflow at every request) unless the environment has
#: them: 3 retries 0, 2 and 4 s apart (+ up to 1 s jitter each) and 30 s to answer, so that a
#: dead server fails a request in ~10 s rather than MLflow's default ~4 minutes (7 retries,
#: backoff 2, 120 s timeout). A slow artifact store may need a longer timeout.
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
#: Seconds the pre-flight probe waits to connect and then for an answer.
PROBE_TIMEOUT = 5.0
#: The settings for requests made once something has failed (closing a run, the exit-time
#: flush of MLflow's queues): one try, a short wait.
_FAIL_FAST = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def home() -> Path:
    return Path(os.environ.get("UPSTREAM_HOME", Path.home() / ".upstream"))


def bound_client_retries() -> None:
    """Put :data:`CLIENT_DEFAULTS` in the environment where it has no value of its own (the
    stage's subprocesses, torchrun's workers, inherit them)."""
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def fail_fast() -> None:
    """From now on, one short try per MLflow request: for a process that is ending on an
    error, so that MLflow's exit-time flushes do not retry against a dead server."""
    os.environ.update(_FAIL_FAST)


@contextlib.contextmanager
def _failing_fast() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _FAIL_FAST}
    os.environ.update(_FAIL_FAST)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tracking_uri() -> str:
    bound_client_retries()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = home() / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def check_reachable(uri: str | None = None) -> None:
    """Fail fast, in one line, when the tracking server does not answer: one GET of its
    ``/health``, :data:`PROBE_TIMEOUT` to connect and to answer, no retries. Stores that are
    not a server (``sqlite:``, files) pass; so does any answer below 500 (authentication and
    the rest are MLflow's to report)."""
    from upstream.faults import redact

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    shown = redact(uri)
    try:
        # Without credentials in the URL (urllib reads them as part of the host): /health
        # needs none.
        with urllib.request.urlopen(shown.rstrip("/") + "/health", timeout=PROBE_TIMEOUT):
            return
    except urllib.error.HTTPError as e:
        if e.code < 500:
            return
        raise UpstreamError(f"MLflow tracking server {shown} is not serving: HTTP {e.code} "
                            "from /health") from None
    except (urllib.error.URLError, OSError) as e:
        why = e.reason if isinstance(e, urllib.error.URLError) else e
        if isinstance(why, TimeoutError | socket.timeout):
            why = f"no answer within {PROBE_TIMEOUT:.0f} s"
        elif isinstance(why, OSError) and why.strerror:
            why = why.strerror.lower()
        raise UpstreamError(f"MLflow tracking server {shown} is unreachable: {why}") from None


def ensure_experiment(name: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if tracking_uri().startswith("sqlite:"):
        artifact_location = (home() / "mlartifacts").as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location)
    except Exception:  # noqa: BLE001 - another process created it first
        exp = mlflow.get_experiment_by_name(name)
        assert exp is not None
        return exp.experiment_id


def package_versions() -> dict[str, str]:
    out = {"upstream": __version__}
    for pkg in RECORDED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def owner() -> str:
    """This process as a run's owner: ``host/pid/start time`` (the start time tells it from
    a later process that reuses the pid)."""
    import psutil

    return f"{socket.gethostname()}/{os.getpid()}/{psutil.Process().create_time():.2f}"


def owner_tags() -> dict[str, str]:
    return {OWNER_TAG: owner()}


def owner_gone(tag: str | None) -> bool:
    """True when ``tag`` names a process of this host that no longer runs; False for a live
    one, another host's (nothing here can tell) or no tag (a run from before owners)."""
    import psutil

    host, _, rest = (tag or "").partition("/")
    pid_text, _, started = rest.partition("/")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        return abs(psutil.Process(int(pid_text)).create_time() - float(started)) > 1.0
    except (psutil.NoSuchProcess, ValueError):
        return True
    except psutil.Error:
        return False


def close_stale_runs(experiment_id: str, fingerprint: str, keep: str | None = None) -> int:
    """Mark FAILED the runs of this config left RUNNING by a process of this host that died
    (SIGKILL, or MLflow down when it ended); return how many. ``keep``: a run to leave open
    (the one a resumed stage adopts)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`upstream.fingerprint` = '{fingerprint}' "
        "and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    closed = 0
    for run in found:
        if run.info.run_id == keep or not owner_gone(run.data.tags.get(OWNER_TAG)):
            continue
        client.set_tag(run.info.run_id, "upstream.closed_by", owner())
        client.set_terminated(run.info.run_id, "FAILED")
        log.warning("MLflow run %s was left RUNNING by a process that died (%s); marked "
                    "FAILED", run.info.run_id, run.data.tags.get(OWNER_TAG))
        closed += 1
    return closed


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (a pod's deletion, ``kill``) raises :class:`Interrupted` as Ctrl-C does, so
    that the open run is ended KILLED rather than left RUNNING. Only in the main thread, and
    only where nobody else handles SIGTERM."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end(run_id: str, status: str, failing: bool) -> None:
    """End ``run_id`` if it is still the active run; after a failure, with one short try (a
    dead server leaves the run RUNNING for the next run of the config to close)."""
    import mlflow

    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return
    if not failing:
        mlflow.end_run(status)
        return
    try:
        with _failing_fast():
            mlflow.end_run(status)
    except Exception as e:  # noqa: BLE001 - the stage's own error is the one to report
        from upstream.faults import reason

        log.warning("could not mark MLflow run %s %s (%s); the next run of this config "
                    "closes it", run_id, status, reason(str(e)))


@contextlib.contextmanager
def stage_run(
    config: StageConfig,
    experiment: str,
    tags: dict[str, Any] | None = None,
    *,
    run_id: str | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Start an MLflow run for one stage call, log its config and provenance, yield the run.

    With ``run_id`` (a resumed training), that run is reopened and goes on: its params were
    logged when it started. ``system_metrics``: MLflow samples CPU, memory (and GPU) usage
    in the background while the run is open. Runs of this config that a dead process of this
    host left RUNNING are closed first. The run ends FAILED on an exception (a service fault
    is re-raised as one :class:`UpstreamError` line naming the service) and KILLED on SIGTERM
    or SIGINT.
    """
    import mlflow

    from upstream.faults import describe

    experiment_id = ensure_experiment(experiment)
    close_stale_runs(experiment_id, config.fingerprint(), keep=run_id)
    with _signals_interrupt():
        if run_id:
            run = mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
            mlflow.set_tags(owner_tags())  # adopted: this process holds it now
        else:
            all_tags = {"upstream.stage": config.stage,
                        "upstream.fingerprint": config.fingerprint(), **owner_tags()}
            if os.environ.get(GROUP_ENV):
                all_tags["upstream.group"] = os.environ[GROUP_ENV]
            all_tags.update({k: str(v) for k, v in (tags or {}).items()})
            # A stage called inside another stage's run (the corruption suite's shard calls)
            # is nested under it, so that the MLflow UI folds them away.
            nested = mlflow.active_run() is not None
            run = mlflow.start_run(experiment_id=experiment_id, run_name=config.stage,
                                   tags=all_tags, log_system_metrics=system_metrics,
                                   nested=nested)
        try:
            if not run_id:
                mlflow.log_params(config.mlflow_params())
                mlflow.log_params({f"version.{k}": v for k, v in package_versions().items()})
            yield run
        except GeneratorExit:
            raise
        except KeyboardInterrupt:
            _end(run.info.run_id, "KILLED", failing=True)
            raise
        except BaseException as e:
            _end(run.info.run_id, "FAILED", failing=True)
            fault = describe(e)
            if fault is not None:
                raise UpstreamError(fault) from None
            raise
        try:
            _end(run.info.run_id, "FINISHED", failing=False)
        except Exception as e:
            fault = describe(e)
            if fault is not None:
                raise UpstreamError(fault) from None
            raise
