"""Multi-node pre-training as a Kubeflow Training Operator ``PyTorchJob`` (kubeflow.org/v1).

A pipeline step that asks for more than one node does not train in its own pod: it builds a
PyTorchJob with :func:`pytorchjob_manifest`, creates it and waits for it with
:func:`submit_and_wait`. The job has one Master and ``nodes - 1`` Workers, every pod running
the same :func:`torchrun_command`.

What the operator does (training-operator v1.7+, ``pkg/controller.v1/pytorch``): it needs a
container named ``pytorch`` in each replica and a port named ``pytorchjob-port`` on it, makes a
Service for ``<job>-master-0``, and appends to that container's env ``MASTER_ADDR``,
``MASTER_PORT``, ``WORLD_SIZE`` (replicas x nprocPerNode), ``RANK`` (the node rank: 0 for the
Master, i + 1 for Worker i), ``PET_MASTER_ADDR``, ``PET_MASTER_PORT``, ``PET_NNODES``,
``PET_NPROC_PER_NODE`` and ``PET_NODE_RANK``. torchrun would read the ``PET_*`` ones by
itself; the command still names them as ``$(VAR)`` arguments, which the kubelet expands from
the container env, so that ``kubectl describe`` shows the launch and a missing variable fails
loudly instead of silently launching a single-node run.

Decisions:

- No ``elasticPolicy``: a fixed world size with torchrun's static rendezvous. Elastic
  resizing would change the global batch mid-run, which a controlled study must not do.
- ``restartPolicy: OnFailure`` and ``runPolicy.backoffLimit`` retry failed pods;
  ``cleanPodPolicy: None`` keeps finished pods, and so their logs, for inspection.
- Resources: CPU is requested but not limited (a CPU limit throttles DataLoader workers);
  memory request = limit; GPUs are limits (extended resources take requests from limits).
- ``/dev/shm`` is a memory-backed emptyDir: the container runtime's default 64 MiB is too small
  for DataLoader workers passing batches through shared memory. Its use counts against the
  container's memory limit.
- Pods are annotated ``sidecar.istio.io/inject: "false"``: Kubeflow profile namespaces inject
  Istio sidecars, which intercept the rendezvous traffic and keep a finished pod running.
- :func:`submit_and_wait` attaches to a job of the same name that already exists instead of
  failing, so that re-running a pipeline step after its pod restarted follows the job it had
  started. It refuses to attach when the existing job was made from a different spec (the
  ``upstream/spec-sha256`` annotation differs), and reports a job that already ended as it
  ended: a failed job is not deleted and re-created (its pods hold the evidence); delete it
  to retry.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from upstream.errors import UpstreamError

_LOG = logging.getLogger(__name__)

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
KIND = "PyTorchJob"
#: The operator looks up this container in every replica (PyTorchJobDefaultContainerName).
CONTAINER_NAME = "pytorch"
#: The operator reads the master port from the container port of this name.
PORT_NAME = "pytorchjob-port"
PORT = 23456
SPEC_HASH_ANNOTATION = "upstream/spec-sha256"
SCHEMA_PATH = Path(__file__).parent.parent / "schemas" / "pytorchjob-v1.json"
#: Kubernetes version whose Pod schema the pod templates are checked against.
K8S_VERSION = "1.30"

#: Env the operator sets on every pod; a user value would be overridden or would override it.
OPERATOR_ENV = frozenset({
    "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "PYTHONUNBUFFERED",
    "PET_MASTER_ADDR", "PET_MASTER_PORT", "PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK",
})

_DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# The CRD's resource.Quantity pattern without the sign: requests must be positive.
_QUANTITY = re.compile(
    r"^(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def torchrun_command(module_args: list[str]) -> list[str]:
    """The container command of every replica: torchrun, then ``python -m <module_args...>``.

    ``module_args[0]`` is a module (``upstream``), the rest its arguments, e.g.
    ``torchrun_command(["upstream", "pretrain", "--config", "s3://b/c.json"])``. Node count,
    processes per node, node rank and the master's address come from the operator's ``PET_*``
    env through Kubernetes ``$(VAR)`` expansion; torchrun then sets ``RANK``, ``LOCAL_RANK``
    and ``WORLD_SIZE`` (all processes) for each process it starts.
    """
    if not module_args or not module_args[0] or module_args[0].startswith("-"):
        raise UpstreamError("torchrun_command: module_args must start with a module name")
    return [
        "torchrun",
        "--nnodes=$(PET_NNODES)",
        "--nproc-per-node=$(PET_NPROC_PER_NODE)",
        "--node-rank=$(PET_NODE_RANK)",
        "--master-addr=$(PET_MASTER_ADDR)",
        "--master-port=$(PET_MASTER_PORT)",
        "-m",
        *module_args,
    ]


def stable_job_name(prefix: str, *parts: str) -> str:
    """A job name that is the same each time a step runs with the same ``parts``.

    Pass what identifies the step (e.g. the KFP run id and task name): a restarted step pod
    then finds, and attaches to, the job it created. The name leaves room for the operator's
    ``-worker-NNN`` suffix on pod and Service names (63 characters at most).
    """
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
    stem = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:40].rstrip("-")
    name = f"{stem}-{digest}" if stem else f"job-{digest}"
    return name if name[0].isalpha() else f"j{name}"


def spec_hash(spec: Mapping[str, Any]) -> str:
    """sha256 of the spec's canonical JSON: tells the same job from a different one."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def pytorchjob_manifest(
    *,
    name: str,
    namespace: str,
    image: str,
    command: list[str],
    nodes: int,
    gpus_per_node: int,
    cpu: str,
    memory: str,
    env: dict[str, str],
    env_from_secrets: list[str],
    service_account: str | None,
    backoff_limit: int = 3,
    labels: dict[str, str] | None = None,
    env_from_config_maps: list[str] | None = None,
    active_deadline_s: int | None = None,
) -> dict[str, Any]:
    """A PyTorchJob with a Master (1 replica) and ``nodes - 1`` Workers of the same pod.

    ``env`` holds plain values (they are readable in the job's spec); credentials come from
    ``env_from_secrets`` (Secret names, every key becomes a variable), settings from
    ``env_from_config_maps``. ``active_deadline_s`` (runPolicy.activeDeadlineSeconds) makes
    the cluster stop the job after that long, freeing its GPUs even when nobody waits for it.
    """
    _check_inputs(
        name=name, namespace=namespace, image=image, command=command, nodes=nodes,
        gpus_per_node=gpus_per_node, cpu=cpu, memory=memory, env=env,
        env_from_secrets=env_from_secrets, env_from_config_maps=env_from_config_maps or [],
        service_account=service_account, backoff_limit=backoff_limit, labels=labels or {},
        active_deadline_s=active_deadline_s,
    )
    limits: dict[str, str] = {"memory": memory}
    if gpus_per_node > 0:
        limits["nvidia.com/gpu"] = str(gpus_per_node)
    env_from = [{"secretRef": {"name": s}} for s in env_from_secrets]
    env_from += [{"configMapRef": {"name": c}} for c in env_from_config_maps or []]
    container: dict[str, Any] = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": list(command),
        "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if env_from:
        container["envFrom"] = env_from
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    template = {
        "metadata": {
            "labels": dict(labels or {}),
            "annotations": {"sidecar.istio.io/inject": "false"},
        },
        "spec": pod_spec,
    }
    run_policy: dict[str, Any] = {"backoffLimit": backoff_limit, "cleanPodPolicy": "None"}
    if active_deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = active_deadline_s
    spec = {
        "nprocPerNode": str(gpus_per_node or 1),
        "pytorchReplicaSpecs": {
            "Master": _replica(1, template),
            "Worker": _replica(nodes - 1, template),
        },
        "runPolicy": run_policy,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": dict(labels or {}),
            "annotations": {SPEC_HASH_ANNOTATION: spec_hash(spec)},
        },
        "spec": spec,
    }


def _replica(replicas: int, template: dict[str, Any]) -> dict[str, Any]:
    # Each replica gets its own copy: a shared dict would be aliased (YAML anchors, edits).
    return {"replicas": replicas, "restartPolicy": "OnFailure", "template": copy.deepcopy(template)}


def _check_inputs(
    *, name: str, namespace: str, image: str, command: list[str], nodes: int,
    gpus_per_node: int, cpu: str, memory: str, env: dict[str, str],
    env_from_secrets: list[str], env_from_config_maps: list[str], service_account: str | None,
    backoff_limit: int, labels: dict[str, str], active_deadline_s: int | None,
) -> None:
    if not isinstance(nodes, int) or nodes < 2:
        raise UpstreamError(f"nodes must be >= 2 for a PyTorchJob (got {nodes!r}); "
                            "train a single node in the step's own pod")
    # The operator names pods and Services <name>-worker-<i>, which must be DNS-1035 labels.
    longest = len(f"{name}-worker-{nodes - 2}")
    if not _DNS1035_LABEL.match(name or "") or longest > 63:
        raise UpstreamError(
            f"job name {name!r} must be a DNS-1035 label (lower-case letters, digits and '-', "
            f"starting with a letter) short enough for pod name {name}-worker-{nodes - 2} "
            "to fit in 63 characters"
        )
    if not _DNS1123_LABEL.match(namespace or "") or len(namespace) > 63:
        raise UpstreamError(f"namespace {namespace!r} is not a DNS-1123 label")
    if not isinstance(gpus_per_node, int) or gpus_per_node < 0:
        raise UpstreamError(f"gpus_per_node must be an integer >= 0 (got {gpus_per_node!r})")
    if not image or not image.strip() or image != image.strip():
        raise UpstreamError(f"image {image!r} must be a non-empty image reference")
    if not command or not all(isinstance(c, str) for c in command):
        raise UpstreamError("command must be a non-empty list of strings (see torchrun_command)")
    for what, value in (("cpu", cpu), ("memory", memory)):
        if not isinstance(value, str) or not _QUANTITY.match(value) or _is_zero(value):
            raise UpstreamError(f"{what} {value!r} is not a positive Kubernetes quantity "
                                "(e.g. '8', '500m', '64Gi')")
    for key, value in env.items():
        if not _ENV_NAME.match(key):
            raise UpstreamError(f"env name {key!r} is not a valid variable name")
        if key in OPERATOR_ENV:
            raise UpstreamError(f"env {key} is set by the training operator; do not set it")
        if not isinstance(value, str):
            raise UpstreamError(f"env {key} must be a string (got {type(value).__name__})")
    for what, names in (("secret", env_from_secrets), ("config map", env_from_config_maps)):
        for n in names:
            if not _DNS1123_SUBDOMAIN.match(n or "") or len(n) > 253:
                raise UpstreamError(f"{what} name {n!r} is not a DNS-1123 subdomain")
    if service_account is not None and (
        not _DNS1123_SUBDOMAIN.match(service_account) or len(service_account) > 253
    ):
        raise UpstreamError(f"service account {service_account!r} is not a DNS-1123 subdomain")
    if not isinstance(backoff_limit, int) or backoff_limit < 0:
        raise UpstreamError(f"backoff_limit must be an integer >= 0 (got {backoff_limit!r})")
    if active_deadline_s is not None and (
        not isinstance(active_deadline_s, int) or active_deadline_s <= 0
    ):
        raise UpstreamError(
            f"active_deadline_s must be a positive integer (got {active_deadline_s!r})"
        )
    for key, value in labels.items():
        prefix, _, label = key.rpartition("/")
        if (
            not _LABEL_NAME.match(label) or len(label) > 63
            or (prefix and (not _DNS1123_SUBDOMAIN.match(prefix) or len(prefix) > 253))
        ):
            raise UpstreamError(f"label key {key!r} is not a valid Kubernetes label key")
        if not isinstance(value, str) or not _LABEL_VALUE.match(value) or len(value) > 63:
            raise UpstreamError(f"label {key}={value!r}: not a valid label value")


def _is_zero(quantity: str) -> bool:
    number = re.match(r"^[0-9.]*", quantity)
    digits = number.group(0) if number else ""
    return not digits.replace(".", "").strip("0")


# --- offline checks -------------------------------------------------------------------------


def check_manifest(manifest: Mapping[str, Any]) -> None:
    """Check a PyTorchJob against the CRD subset and the operator's own rules; one-line errors.

    The schema is ``schemas/pytorchjob-v1.json``; the rules are those of the operator's
    validating webhook (replica types Master and Worker only, Master replicas 1, Worker
    replicas >= 1, a container named ``pytorch`` with an image in each replica). Needs
    ``jsonschema``.
    """
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=_int_format_checker())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    name = _job_label(manifest)
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        message = error.message
        if error.validator == "const":  # jsonschema's own message omits what was found
            message = f"{error.instance!r} is not {error.validator_value!r}"
        raise UpstreamError(f"{name}: {path}: {_one_line(message)}")
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    if set(replicas) - {"Master", "Worker"}:
        extra = ", ".join(sorted(set(replicas) - {"Master", "Worker"}))
        raise UpstreamError(f"{name}: replica types must be Master and Worker (got {extra})")
    if "Master" not in replicas:
        raise UpstreamError(f"{name}: a Master replica is required (it hosts the rendezvous)")
    for role, spec in replicas.items():
        count = spec.get("replicas", 1)
        if role == "Master" and count != 1:
            raise UpstreamError(f"{name}: Master replicas must be 1 (got {count})")
        if role == "Worker" and count < 1:
            raise UpstreamError(f"{name}: Worker replicas must be at least 1 (got {count})")
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        named = [c for c in containers if c.get("name") == CONTAINER_NAME]
        if not named:
            raise UpstreamError(f"{name}: {role} needs a container named {CONTAINER_NAME!r} "
                                "(the operator requires that name)")
        if any(not c.get("image") for c in containers):
            raise UpstreamError(f"{name}: every {role} container needs an image")


def check_pod_templates(manifest: Mapping[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """Check each replica's pod template as a v1 Pod with kubernetes-validate (strict)."""
    import kubernetes_validate

    name = _job_label(manifest)
    for role, spec in manifest["spec"]["pytorchReplicaSpecs"].items():
        template = spec.get("template") or {}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{manifest['metadata']['name']}-{role.lower()}-0",
                         **(template.get("metadata") or {})},
            "spec": template.get("spec") or {},
        }
        try:
            kubernetes_validate.validate(pod, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path) or "(top level)"
            raise UpstreamError(
                f"{name}: {role} pod template: {path}: {_one_line(e.message)}"
            ) from e


def _int_format_checker() -> Any:
    import jsonschema

    checker = jsonschema.FormatChecker()
    for fmt, bits in (("int32", 32), ("int64", 64)):
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

        def check(value: object, low: int = low, high: int = high) -> bool:
            return not isinstance(value, int) or low <= value <= high

        checker.checks(fmt)(check)
    return checker


def _job_label(manifest: Mapping[str, Any]) -> str:
    meta = manifest.get("metadata") if isinstance(manifest, Mapping) else None
    meta = meta if isinstance(meta, Mapping) else {}
    return f"PyTorchJob {meta.get('namespace', '?')}/{meta.get('name', '?')}"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --- submit and wait ------------------------------------------------------------------------

#: Consecutive failed polls (API server restarting, network blips) tolerated while waiting.
MAX_POLL_FAILURES = 5


def submit_and_wait(
    manifest: dict[str, Any],
    *,
    poll_s: float = 10,
    timeout_s: float | None = None,
    api: Any = None,
    log: Callable[[str], None] = _LOG.info,
) -> str:
    """Create the PyTorchJob (or attach to it), report its progress, return ``"Succeeded"``.

    ``api`` is a ``kubernetes.client.CustomObjectsApi`` or anything with its
    ``create_namespaced_custom_object`` and ``get_namespaced_custom_object`` methods; by
    default one is built from the in-cluster config, else ``~/.kube/config``. Each new
    condition (type, reason, message) and each change of the replica counts is passed to
    ``log``. Raises :class:`UpstreamError` naming the job when it fails (with the failing
    condition's message), when ``timeout_s`` passes (the job keeps running: set
    ``active_deadline_s`` on the manifest for a cluster-side limit), or when the API refuses.
    """
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    meta = manifest.get("metadata") or {}
    name, namespace = meta.get("name"), meta.get("namespace")
    if not name or not namespace:
        raise UpstreamError("the PyTorchJob manifest needs metadata.name and metadata.namespace")
    where = f"PyTorchJob {namespace}/{name}"
    api = api if api is not None else _custom_objects_api()
    ref = {"group": GROUP, "version": VERSION, "namespace": namespace, "plural": PLURAL}
    try:
        api.create_namespaced_custom_object(**ref, body=manifest)
        log(f"{where}: created")
    except ApiException as e:
        if e.status != 409:
            raise _api_error(where, "create", e) from e
        _attach(api, ref, name, manifest, where, log)
    except (HTTPError, OSError) as e:
        raise UpstreamError(f"{where}: cannot reach the API server: {_one_line(str(e))}") from e

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: set[tuple[str, str, str]] = set()
    last_replicas = ""
    state = "waiting for its first status"
    failures = 0
    while True:
        try:
            job = api.get_namespaced_custom_object(**ref, name=name)
        except ApiException as e:
            if e.status == 404:
                raise UpstreamError(f"{where} was deleted while waiting for it") from e
            if not _transient(e.status) or failures >= MAX_POLL_FAILURES:
                raise _api_error(where, "read", e) from e
            failures += 1
            log(f"{where}: reading its status failed ({e.status} {e.reason}); retrying")
        except (HTTPError, OSError) as e:
            if failures >= MAX_POLL_FAILURES:
                raise UpstreamError(
                    f"{where}: cannot reach the API server: {_one_line(str(e))}"
                ) from e
            failures += 1
            log(f"{where}: reading its status failed ({_one_line(str(e))}); retrying")
        else:
            failures = 0
            status = job.get("status") or {}
            for cond in _true_conditions(status):
                key = (cond.get("type", ""), cond.get("reason", ""), cond.get("message", ""))
                if key not in seen:
                    seen.add(key)
                    log(f"{where}: {key[0]} ({key[1] or 'no reason'}): {_one_line(key[2])}")
            replicas = _replica_summary(status)
            if replicas and replicas != last_replicas:
                last_replicas = replicas
                log(f"{where}: {replicas}")
            final = _final_condition(status)
            if final is not None and final["type"] == "Succeeded":
                return "Succeeded"
            if final is not None:
                raise UpstreamError(
                    f"{where} failed ({final.get('reason') or 'no reason'}): "
                    f"{_one_line(final.get('message') or 'no message')}"
                )
            state = _current_state(status)
        if deadline is not None and time.monotonic() >= deadline:
            raise UpstreamError(
                f"{where} is still {state} after {timeout_s:g} s; it keeps running "
                f"(kubectl delete pytorchjob -n {namespace} {name} stops it)"
            )
        remaining = poll_s if deadline is None else max(0.0, deadline - time.monotonic())
        time.sleep(min(poll_s, remaining))


def _attach(
    api: Any, ref: dict[str, str], name: str, manifest: Mapping[str, Any], where: str,
    log: Callable[[str], None],
) -> None:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        existing = api.get_namespaced_custom_object(**ref, name=name)
    except ApiException as e:
        raise _api_error(where, "read", e) from e
    except (HTTPError, OSError) as e:
        raise UpstreamError(f"{where}: cannot reach the API server: {_one_line(str(e))}") from e
    theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
    ours = spec_hash(manifest.get("spec") or {})
    if theirs != ours:
        raise UpstreamError(
            f"{where} already exists with a different spec; delete it "
            f"(kubectl delete pytorchjob -n {ref['namespace']} {name}) or use another name"
        )
    log(f"{where}: already exists with this spec; attaching to it")


def _true_conditions(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [c for c in status.get("conditions") or [] if c.get("status") == "True"]


def _final_condition(status: Mapping[str, Any]) -> dict[str, Any] | None:
    """The true Succeeded or Failed condition, or None while the job is not finished."""
    for cond in _true_conditions(status):
        if cond.get("type") in ("Succeeded", "Failed"):
            return cond
    return None


def _current_state(status: Mapping[str, Any]) -> str:
    conds = _true_conditions(status)
    return (conds[-1].get("type") or "unknown") if conds else "without conditions"


def _replica_summary(status: Mapping[str, Any]) -> str:
    parts = []
    for role, counts in sorted((status.get("replicaStatuses") or {}).items()):
        counts = counts or {}
        parts.append(
            f"{role} active={counts.get('active', 0)} succeeded={counts.get('succeeded', 0)} "
            f"failed={counts.get('failed', 0)}"
        )
    return "; ".join(parts)


def _transient(status: int | None) -> bool:
    # 0/None: no HTTP response at all; 429 and 5xx: the server asks to come back later.
    return status in (0, None, 429) or (isinstance(status, int) and status >= 500)


def _api_error(where: str, verb: str, e: Any) -> UpstreamError:
    if e.status == 403:
        return UpstreamError(
            f"{where}: forbidden to {verb} pytorchjobs.kubeflow.org: give the pod's service "
            "account the Role the chart makes (rbac.serviceAccountName)"
        )
    if e.status == 404 and verb == "create":
        return UpstreamError(
            f"{where}: the API server has no {PLURAL}.{GROUP}/{VERSION}: "
            "is the Kubeflow Training Operator installed?"
        )
    detail = e.reason or ""
    with contextlib.suppress(TypeError, ValueError, AttributeError):  # body: JSON Status or not
        detail = json.loads(e.body).get("message") or detail
    return UpstreamError(f"{where}: {verb} failed ({e.status}): {_one_line(detail)}")


def _custom_objects_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            # kubernetes.config reads $KUBECONFIG once, at import: read it now instead.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        except config.ConfigException as e:
            raise UpstreamError(
                "no Kubernetes configuration: not inside a cluster and no usable "
                f"~/.kube/config or $KUBECONFIG ({_one_line(str(e))})"
            ) from e
    return client.CustomObjectsApi()
