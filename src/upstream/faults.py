"""A failing MLflow or S3 service, told in one line naming the service.

A dead service surfaces deep inside a client library, as an exception several layers down a
chain (MLflow's ``MlflowException`` around requests' around urllib3's; botocore's
``EndpointConnectionError``). :func:`describe` finds the service in that chain and says what
happened to it, so that the CLI prints one ``error:`` line instead of a traceback; anything
that is not a service fault gives None and is left alone.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator

#: What the text of a client error says about the connection, as the line reports it.
_REASONS = (
    (re.compile(r"connection refused|errno 111", re.I), "connection refused"),
    (re.compile(r"timed? ?out|timeout", re.I), "no answer in time"),
    (re.compile(r"too many (\d{3}) error responses", re.I), "answered HTTP {0} repeatedly"),
    (re.compile(r"connection (reset|aborted)|remote ?disconnected|broken pipe|"
                r"connection closed", re.I), "the connection was dropped"),
    (re.compile(r"name or service not known|nodename nor servname|failed to resolve", re.I),
     "the host name does not resolve"),
)


_MLFLOW_FAULT = re.compile(
    r"failed with (timeout )?exception|Max retries exceeded|failed with error code 5\d\d"
)


def redact(uri: str) -> str:
    """``uri`` without a user name or password in it, fit for a message or a log line."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, parts.query, ""))


def reason(text: str) -> str:
    """A short reason for a failed request, from the client's (long) message."""
    for pattern, said in _REASONS:
        found = pattern.search(text)
        if found:
            return said.format(*found.groups())
    first = text.strip().splitlines()[0] if text.strip() else "no detail"
    return first if len(first) <= 200 else first[:200] + "..."


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 20:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if e.__cause__ is not None:
            todo.append(e.__cause__)
        elif e.__context__ is not None and not e.__suppress_context__:
            todo.append(e.__context__)


def _is_s3_fault(e: BaseException) -> bool:
    try:
        from botocore import exceptions as bce
    except ImportError:
        return False
    # ConnectionError: refused, connect timeouts, unknown hosts; HTTPClientError: read
    # timeouts, dropped connections, a body that stopped streaming.
    return isinstance(e, bce.ConnectionError | bce.HTTPClientError)


def _is_mlflow_fault(e: BaseException) -> bool:
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    if not isinstance(e, MlflowException):
        return False
    # What MLflow's REST client raises once its retries are spent (also inside the message
    # of an asynchronous logging failure); an answer such as "failed with error code 404" is
    # the server speaking, not a fault, unless it is a 5xx.
    return bool(_MLFLOW_FAULT.search(str(e)))


def describe(exc: BaseException) -> str | None:
    """One line naming the service that failed and how, or None (not a service fault)."""
    from upstream import storage, tracking
    from upstream.errors import UpstreamError

    if isinstance(exc, UpstreamError):
        return None  # already one line, and a more precise one
    for e in _chain(exc):
        if _is_mlflow_fault(e):
            where = redact(tracking.tracking_uri())
            said = reason(str(e))
            hint = " (its artifact store may be down)" if said.startswith("answered HTTP 5") else ""
            return f"MLflow tracking server {where} failed during the stage: {said}{hint}"
        if _is_s3_fault(e):
            where = storage.endpoint_url() or "AWS S3"
            return f"S3 endpoint {where} failed during the stage: {reason(str(e))}"
    return None
