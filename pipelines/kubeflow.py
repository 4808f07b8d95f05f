"""Uploading pipelines to a Kubeflow Pipelines backend and starting runs there.

``upstream upload`` and ``upstream submit`` talk to the backend's v2beta1 REST API through
``kfp.Client``. What they send, and why:

- **The YAML** is ``pipelines/compiled/<name>.yaml`` when it exists (what ``upstream compile``
  writes and CI keeps current, so what is uploaded is what was reviewed), else the pipeline
  compiled in memory.
- **Versions.** The first upload of a pipeline creates it; the backend names that first
  version after the pipeline. Each later upload adds a version named ``--version`` or, by
  default, ``<pipeline>-<first 12 hex digits of the YAML's sha256>``: deterministic, unique
  per content, and it makes re-uploading YAML that is already a version a no-op that prints
  the existing ids instead of a duplicate.
- **Runs** carry the compiled YAML inline (no upload needed) and only the parameters given;
  the backend fills in the YAML's defaults for the rest. Values are parsed to each
  parameter's declared type and validated like ``upstream run`` does before the backend is
  contacted.
- **The token** is read from ``$KF_PIPELINES_TOKEN``, else from the file named by
  ``$KF_PIPELINES_SA_TOKEN_PATH`` (kfp's variable for a projected service-account token),
  else from kfp's default path for that token when it exists (inside a cluster). It goes to
  ``kfp.Client(existing_token=...)``, which sends it as ``Authorization: Bearer ...``; it is
  never printed. No token: plain requests, as through ``kubectl port-forward``.
- **Reachability** is probed first with one healthz request and a short timeout: kfp.Client's
  constructor would otherwise retry healthz 5 times 5 s apart (each with urllib3's own
  retries), or wait minutes on a host that drops packets.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import hashlib
import io
import json
import math
import os
import tempfile
import typing
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from upstream.errors import UpstreamError

TOKEN_ENV = "KF_PIPELINES_TOKEN"
#: kfp's own name for the variable holding the path of a service-account token file.
TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
#: Where Kubeflow projects that token into pods (kfp.client.KF_PIPELINES_SA_TOKEN_PATH).
DEFAULT_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"
#: Seconds the backend has to accept the connection and answer the healthz probe.
PROBE_TIMEOUT_S = 5.0
#: The pipeline parameter that ``--spec FILE`` fills with the file's text.
SPEC_PARAM = "spec"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _pipeline(name: str) -> tuple[Any, list[Any]]:
    # Looked up on every call (not imported once) so that tests can register a pipeline.
    from upstream.pipelines import registry

    known = registry.pipelines()
    if name not in known:
        raise UpstreamError(f"unknown pipeline {name!r} (known: {', '.join(sorted(known))})")
    return known[name]


# --- parameters -------------------------------------------------------------------------------


def parse_value(name: str, tp: Any, text: str) -> Any:
    """``text`` as a value of the declared parameter type ``tp``."""
    def bad(expected: str) -> UpstreamError:
        return UpstreamError(f"invalid --param {name}={text}: expected {expected}")

    if tp is str:
        return text
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise bad("true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise bad("an integer") from None
    if tp is float:
        try:
            value = float(text)
        except ValueError:
            raise bad("a number") from None
        if not math.isfinite(value):  # JSON, and so the backend, has no NaN or infinity
            raise bad("a finite number")
        return value
    container = typing.get_origin(tp) or tp
    if container in (list, dict):
        kind = "a JSON list" if container is list else "a JSON object"
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise bad(kind) from None
        if not isinstance(value, container):
            raise bad(kind)
        return value
    raise UpstreamError(f"parameter {name} has a type --param cannot set ({tp!r})")


def parse_params(
    name: str, pairs: Sequence[str], spec_file: Path | None = None
) -> dict[str, Any]:
    """``NAME=VALUE`` pairs (and a spec file's text) as typed values of pipeline ``name``."""
    _, params = _pipeline(name)
    declared = {p.name: p for p in params}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        # The CLI spells parameters with dashes (--pretrain-lr); accept that spelling too.
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise UpstreamError(f"--param takes NAME=VALUE (got {pair!r})")
        if key not in declared:
            close = difflib.get_close_matches(key, declared, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise UpstreamError(f"unknown parameter {key!r} of pipeline {name}{hint}")
        if key in values:
            raise UpstreamError(f"--param {key} is given twice")
        values[key] = parse_value(key, declared[key].type, text)
    if spec_file is not None:
        if SPEC_PARAM not in declared:
            raise UpstreamError(f"pipeline {name} has no {SPEC_PARAM!r} parameter, so --spec "
                                "does not apply to it")
        if SPEC_PARAM in values:
            raise UpstreamError("give the spec as --spec FILE or as --param spec=..., not both")
        values[SPEC_PARAM] = _read_spec(spec_file)
    return values


def _read_spec(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UpstreamError(f"spec file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UpstreamError(f"cannot read spec file {path}: {e}") from None
    if not text.strip():
        raise UpstreamError(f"spec file {path} is empty")
    return text


# --- the compiled pipeline --------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A compiled pipeline on disk (kfp.Client uploads files) and its text."""

    path: Path
    text: str
    origin: str


@contextlib.contextmanager
def pipeline_package(name: str) -> Iterator[Package]:
    """The checked-in compiled YAML of ``name``, or the pipeline compiled into a temp file."""
    from upstream.compile import default_output_dir

    pipeline, _ = _pipeline(name)
    compiled = default_output_dir() / f"{name}.yaml"
    if compiled.is_file():
        yield Package(compiled, compiled.read_text(encoding="utf-8"), str(compiled))
        return
    from kfp import compiler

    with tempfile.TemporaryDirectory(prefix="upstream-kfp-") as tmp:
        path = Path(tmp) / f"{name}.yaml"
        compiler.Compiler().compile(pipeline, str(path))
        yield Package(path, path.read_text(encoding="utf-8"), "compiled in memory")


def yaml_parameters(yaml_text: str) -> set[str]:
    """The names of a compiled pipeline's parameters."""
    import yaml

    spec = next(yaml.safe_load_all(yaml_text), None) or {}
    return set(((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {})


def default_version_name(name: str, yaml_text: str) -> str:
    return f"{name}-{hashlib.sha256(yaml_text.encode()).hexdigest()[:12]}"


# --- the backend ------------------------------------------------------------------------------


def normalize_host(host: str) -> str:
    """The API URL as kfp.Client would use it (https:// when no scheme, no trailing slash)."""
    host = (host or "").strip()
    if not host:
        raise UpstreamError("--host is empty: give the Kubeflow Pipelines API URL")
    if "://" not in host:
        host = "https://" + host
    return host.rstrip("/")


def token_from_env() -> str | None:
    """The API token (see the module docstring for where it is looked for)."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = os.environ.get(TOKEN_PATH_ENV, "").strip()
    if not path:
        if not os.path.isfile(DEFAULT_TOKEN_PATH):
            return None
        path = DEFAULT_TOKEN_PATH
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as e:
        raise UpstreamError(f"cannot read the token file {path} (${TOKEN_PATH_ENV}): "
                            f"{e.strerror or e}") from None
    if not token:
        raise UpstreamError(f"the token file {path} (${TOKEN_PATH_ENV}) is empty")
    return token


def _why(error: BaseException) -> str:
    """One line on why a request failed, without urllib3's pool and retry wrapping."""
    from urllib3 import exceptions as x

    if isinstance(error, x.MaxRetryError) and error.reason is not None:
        return _why(error.reason)
    # NameResolutionError < NewConnectionError < ConnectTimeoutError: most specific first.
    if isinstance(error, x.NameResolutionError):
        return "host name not found"
    if isinstance(error, x.NewConnectionError):
        return str(error).rsplit(": ", 1)[-1]
    if isinstance(error, x.TimeoutError):
        return f"no answer within {PROBE_TIMEOUT_S:g} s"
    if isinstance(error, x.SSLError):
        return f"TLS error: {error}"
    return " ".join(f"{type(error).__name__}: {error}".split())


def probe(host: str, token: str | None) -> None:
    """Fail fast, in one line naming ``host``, unless its healthz endpoint answers 200."""
    import certifi
    import urllib3

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # The same trust store as kfp.Client (certifi), no retries, no redirects (a redirect is
    # a login page, not the API).
    http = urllib3.PoolManager(cert_reqs="CERT_REQUIRED", ca_certs=certifi.where())
    try:
        response = http.request(
            "GET", f"{host}/apis/v2beta1/healthz", headers=headers, retries=False,
            redirect=False, timeout=urllib3.Timeout(total=PROBE_TIMEOUT_S),
        )
    except urllib3.exceptions.HTTPError as e:
        raise UpstreamError(f"cannot reach Kubeflow Pipelines at {host}: {_why(e)}") from None
    finally:
        http.clear()
    status = response.status
    if status == 200:
        return
    if status in (401, 403):
        hint = "the token was refused" if token else f"set {TOKEN_ENV} to an API token"
        raise UpstreamError(f"{host} answered HTTP {status} (not authorised): {hint}")
    if 300 <= status < 400:
        raise UpstreamError(
            f"{host} redirects to {response.headers.get('Location', '?')} (a login page?): "
            f"give the pipelines API URL and a token in {TOKEN_ENV}"
        )
    if status == 404:
        raise UpstreamError(
            f"{host} has no Kubeflow Pipelines v2beta1 API (healthz: HTTP 404); give the API "
            "URL, e.g. http://localhost:8888 after `kubectl port-forward -n kubeflow "
            "svc/ml-pipeline 8888:8888`"
        )
    raise UpstreamError(f"{host} is not healthy: healthz answered HTTP {status}")


def _api_message(error: Any) -> str:
    text = ""
    try:
        body = json.loads(error.body or "{}")
        text = str(body.get("message") or body.get("error") or "")
    except (ValueError, AttributeError):
        text = str(error.body or "")
    text = " ".join((text or str(error.reason or "")).split())
    return text[:300]


@contextlib.contextmanager
def _backend_errors(host: str) -> Iterator[None]:
    """The backend's and the connection's failures as one-line UpstreamErrors."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as e:
        raise UpstreamError(f"{host} refused the request: HTTP {e.status} "
                            f"{_api_message(e)}") from None
    except urllib3.exceptions.HTTPError as e:
        raise UpstreamError(f"lost the connection to {host}: {_why(e)}") from None
    except ValueError as e:  # kfp's own checks, e.g. two experiments with one name
        raise UpstreamError(f"{host}: {e}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # kfp.Client prints "Run details: <link>" lines and warns that it needs KFP ≥ 2.0.0-beta.2;
    # upstream prints its own summary.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore", FutureWarning)
        yield


def connect(host: str) -> Any:
    """A kfp.Client for ``host`` once its healthz endpoint answers (token from the env)."""
    import kfp

    host = normalize_host(host)
    token = token_from_env()
    probe(host, token)
    with _backend_errors(host), _quiet():
        return kfp.Client(host=host, existing_token=token)


def _ui(host: str) -> str:
    # Where links point: kfp's own variable for a UI at another address than the API.
    return os.environ.get("KF_PIPELINES_UI_ENDPOINT", "").rstrip("/") or host


def _name_filter(display_name: str) -> str:
    return json.dumps({"predicates": [
        {"operation": "EQUALS", "key": "display_name", "stringValue": display_name},
    ]})


# --- the commands -----------------------------------------------------------------------------


def upload(
    name: str, host: str, version: str | None = None, namespace: str | None = None
) -> dict[str, Any]:
    """Upload pipeline ``name`` (a new pipeline, or a new version of it); return its ids."""
    pipeline, _ = _pipeline(name)
    host = normalize_host(host)
    with pipeline_package(name) as package:
        version_name = version or default_version_name(name, package.text)
        client = connect(host)
        with _backend_errors(host), _quiet():
            found = client.list_pipelines(filter=_name_filter(name), namespace=namespace,
                                          page_size=2).pipelines or []
            if len(found) > 1:
                raise UpstreamError(f"{host} has several pipelines named {name!r}")
            note = None
            if not found:
                created = client.upload_pipeline(
                    str(package.path), pipeline_name=name,
                    description=(pipeline.description or "").strip() or None,
                    namespace=namespace,
                )
                pipeline_id = created.pipeline_id
                # The backend made the first version itself; ask which.
                first = client.list_pipeline_versions(
                    pipeline_id, page_size=1, sort_by="created_at desc").pipeline_versions or []
                version_id = first[0].pipeline_version_id if first else None
                version_name = first[0].display_name if first else name
                action = "created pipeline"
                if version:
                    note = ("the backend names a new pipeline's first version; --version "
                            "names the versions later uploads add")
            else:
                pipeline_id = found[0].pipeline_id
                same = client.list_pipeline_versions(
                    pipeline_id, filter=_name_filter(version_name),
                    page_size=1).pipeline_versions or []
                if same and version:
                    raise UpstreamError(
                        f"pipeline {name} already has a version named {version_name!r} "
                        f"(id {same[0].pipeline_version_id}): choose another --version"
                    )
                if same:
                    version_id = same[0].pipeline_version_id
                    action = "unchanged (this YAML is already that version)"
                else:
                    added = client.upload_pipeline_version(
                        str(package.path), version_name, pipeline_id=pipeline_id)
                    version_id = added.pipeline_version_id
                    action = "added version"
    result = {
        "pipeline": name, "pipeline_id": pipeline_id, "version": version_name,
        "version_id": version_id, "action": action, "yaml": package.origin,
        "url": f"{_ui(host)}/#/pipelines/details/{pipeline_id}/version/{version_id}",
    }
    if note:
        result["note"] = note
    return result


def submit(
    name: str,
    host: str,
    params: Sequence[str] = (),
    spec_file: Path | None = None,
    experiment: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """Start a run of pipeline ``name`` on ``host``; return its ids and link."""
    from upstream.pipelines.launch import _check_values

    values = parse_params(name, params, spec_file)
    _check_values(name, values)
    _, declared = _pipeline(name)
    defaults = {p.name: p.default for p in declared}
    # The KFP experiment defaults to the run's MLflow experiment, so both group runs alike.
    experiment = (experiment or values.get("experiment") or defaults.get("experiment")
                  or "upstream")
    host = normalize_host(host)
    with pipeline_package(name) as package:
        # A checked-in YAML older than the source lacks new parameters; the backend would
        # refuse the run only after the upload of the whole spec.
        missing = sorted(set(values) - yaml_parameters(package.text))
        if missing:
            raise UpstreamError(f"{package.origin} has no parameter {', '.join(missing)}: it "
                                "is older than the pipeline's source (run `upstream compile`)")
        client = connect(host)
        with _backend_errors(host), _quiet():
            result = client.create_run_from_pipeline_package(
                str(package.path), arguments=values, experiment_name=experiment,
                namespace=namespace,
                run_name=f"{name} {dt.datetime.now():%Y-%m-%d %H-%M-%S}",
            )
    return {
        "pipeline": name, "run_id": result.run_id, "experiment": experiment,
        "experiment_id": result.run_info.experiment_id, "parameters": sorted(values),
        "yaml": package.origin, "url": f"{_ui(host)}/#/runs/details/{result.run_id}",
    }
