"""Multi-node pre-training as a Kubeflow PyTorchJob (kubeflow.org/v1).

No Kubernetes cluster exists here. The manifests are checked offline: against the CRD subset
in ``upstream/schemas/pytorchjob-v1.json`` plus the operator's webhook rules, and each pod
template against the Kubernetes Pod schema with kubernetes-validate. The launch command is
parsed by torch's own torchrun parser with the env the operator would inject. Create, wait and
attach are tested against ``StandInApi``, a small recording stand-in for the Kubernetes API
(the two ``CustomObjectsApi`` methods used, raising the client's real ``ApiException``) that
replays the status conditions the training operator writes.
"""

from __future__ import annotations

import copy
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from upstream.errors import UpstreamError
from upstream.pretrain.pytorchjob import (
    OPERATOR_ENV,
    SPEC_HASH_ANNOTATION,
    check_manifest,
    check_pod_templates,
    pytorchjob_manifest,
    spec_hash,
    stable_job_name,
    submit_and_wait,
    torchrun_command,
)

NS, NAME = "team-a", "pretrain-abc"
WHERE = f"PyTorchJob {NS}/{NAME}"


def make(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        name=NAME,
        namespace=NS,
        image="ghcr.io/example/upstream:cuda",
        command=torchrun_command(["upstream", "pretrain", "--config", "s3://b/pretrain.json"]),
        nodes=2,
        gpus_per_node=8,
        cpu="32",
        memory="400Gi",
        env={"NCCL_DEBUG": "WARN"},
        env_from_secrets=["upstream-s3"],
        env_from_config_maps=["upstream-settings"],
        service_account="default-editor",
        labels={"app.kubernetes.io/name": "upstream"},
    )
    args.update(overrides)
    return pytorchjob_manifest(**args)


# --- the manifest ---------------------------------------------------------------------------


@pytest.mark.parametrize(("nodes", "gpus"), [(2, 8), (4, 0)])
def test_manifest_passes_the_crd_schema_and_the_pod_schema(nodes: int, gpus: int) -> None:
    job = make(nodes=nodes, gpus_per_node=gpus, backoff_limit=5)
    check_manifest(job)
    check_pod_templates(job)

    spec = job["spec"]
    assert spec["nprocPerNode"] == str(gpus or 1)
    assert "elasticPolicy" not in spec
    assert spec["runPolicy"] == {"backoffLimit": 5, "cleanPodPolicy": "None"}
    replicas = spec["pytorchReplicaSpecs"]
    assert {r: s["replicas"] for r, s in replicas.items()} == {"Master": 1, "Worker": nodes - 1}
    for s in replicas.values():
        assert s["restartPolicy"] == "OnFailure"
        pod = s["template"]["spec"]
        (container,) = pod["containers"]
        assert container["name"] == "pytorch"
        assert container["ports"][0]["name"] == "pytorchjob-port"
        limits = container["resources"]["limits"]
        assert limits.get("nvidia.com/gpu") == (str(gpus) if gpus else None)
        assert container["resources"]["requests"] == {"cpu": "32", "memory": "400Gi"}
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert container["envFrom"] == [
            {"secretRef": {"name": "upstream-s3"}}, {"configMapRef": {"name": "upstream-settings"}}
        ]
        assert pod["serviceAccountName"] == "default-editor"
    # Master and Worker are equal but not the same object (no aliasing between replicas)
    assert replicas["Master"]["template"] == replicas["Worker"]["template"]
    assert replicas["Master"]["template"] is not replicas["Worker"]["template"]
    assert job["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == spec_hash(spec)


def test_manifest_without_service_account_or_secrets_is_valid() -> None:
    job = make(service_account=None, env_from_secrets=[], env_from_config_maps=None, env={},
               labels=None, active_deadline_s=86400)
    check_manifest(job)
    check_pod_templates(job)
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert "serviceAccountName" not in pod and "envFrom" not in pod["containers"][0]
    assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 86400


def test_torchrun_command_launches_what_the_operator_describes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The kubelet expands $(VAR) from the env the operator adds; torchrun parses the result."""
    from torch.distributed.run import config_from_args, parse_args

    command = torchrun_command(["upstream", "pretrain", "--config", "s3://b/c.json"])
    assert command[0] == "torchrun"
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(command)))
    assert referenced and referenced <= OPERATOR_ENV

    # What training-operator v1 sets on Worker 1 of a 4-node job with nprocPerNode "8".
    operator_env = {"PET_NNODES": "4", "PET_NPROC_PER_NODE": "8", "PET_NODE_RANK": "2",
                    "PET_MASTER_ADDR": f"{NAME}-master-0", "PET_MASTER_PORT": "23456"}
    for key in operator_env:  # torchrun would read these itself: prove the flags do the work
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # else config_from_args sets it in this process
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: operator_env[m.group(1)], a) for a in command]
    config, cmd, cmd_args = config_from_args(parse_args(expanded[1:]))
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (4, 4, 8)
    assert config.rdzv_backend == "static"
    assert config.rdzv_endpoint == f"{NAME}-master-0:23456"
    assert config.rdzv_configs["rank"] == 2
    assert cmd_args[-5:] == ["-m", "upstream", "pretrain", "--config", "s3://b/c.json"]


def test_torchrun_command_needs_a_module() -> None:
    for bad in ([], ["--config"], [""]):
        with pytest.raises(UpstreamError, match="module"):
            torchrun_command(bad)


def test_stable_job_name_is_a_stable_dns_label() -> None:
    a = stable_job_name("Pretrain CLIP", "run-1", "pretrain")
    assert a == stable_job_name("Pretrain CLIP", "run-1", "pretrain")
    assert a != stable_job_name("Pretrain CLIP", "run-2", "pretrain")
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", a)
    assert re.fullmatch(r"j?[a-z0-9-]+", stable_job_name("123", "x"))
    check_manifest(make(name=stable_job_name("x" * 80, "r"), nodes=64))


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"nodes": 1}, "nodes must be >= 2"),
        ({"nodes": 0}, "nodes must be >= 2"),
        ({"name": "Pretrain"}, "DNS-1035"),
        ({"name": "1pretrain"}, "DNS-1035"),
        ({"name": "p" * 55, "nodes": 16}, "63 characters"),
        ({"namespace": "Team A"}, "namespace"),
        ({"gpus_per_node": -1}, "gpus_per_node"),
        ({"image": ""}, "image"),
        ({"command": []}, "command"),
        ({"cpu": "lots"}, "cpu"),
        ({"memory": "0Gi"}, "memory"),
        ({"memory": "-1Gi"}, "memory"),
        ({"env": {"MASTER_ADDR": "x"}}, "set by the training operator"),
        ({"env": {"PET_NNODES": "2"}}, "set by the training operator"),
        ({"env": {"1BAD": "x"}}, "env name"),
        ({"env": {"SEED": 1}}, "must be a string"),
        ({"env_from_secrets": ["S3_Keys"]}, "secret name"),
        ({"service_account": "Bad Account"}, "service account"),
        ({"backoff_limit": -1}, "backoff_limit"),
        ({"active_deadline_s": 0}, "active_deadline_s"),
        ({"labels": {"team": "a b"}}, "label"),
        ({"labels": {"-bad": "x"}}, "label key"),
    ],
)
def test_bad_inputs_give_one_line_errors(overrides: dict[str, Any], fragment: str) -> None:
    with pytest.raises(UpstreamError) as info:
        make(**overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


# --- the schema check rejects broken manifests ----------------------------------------------


def _broken(edit: Any) -> dict[str, Any]:
    job = copy.deepcopy(make(nodes=3))
    edit(job)
    return job


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda j: _worker(j).update(replicas="2"), "replicas: '2' is not of type 'integer'"),
        (lambda j: _worker(j).update(replicas=2**31), "replicas"),
        (lambda j: _worker(j)["template"]["spec"]["containers"][0].update(name="trainer"),
         "container named 'pytorch'"),
        (lambda j: _worker(j)["template"]["spec"]["containers"][0].pop("name"), "'name'"),
        (lambda j: _worker(j).update(restartPolicy="Sometimes"), "restartPolicy"),
        (lambda j: j["spec"].update(nProcPerNode="8"), "nProcPerNode"),
        (lambda j: j["spec"].update(nprocPerNode=8), "nprocPerNode"),
        (lambda j: j["spec"]["runPolicy"].update(backoffLimit="3"), "backoffLimit"),
        (lambda j: j["spec"]["runPolicy"].update(cleanPodPolicy="Never"), "cleanPodPolicy"),
        (lambda j: j["spec"].pop("pytorchReplicaSpecs"), "pytorchReplicaSpecs"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"]["Master"].update(replicas=2),
         "Master replicas must be 1"),
        (lambda j: _worker(j).update(replicas=0), "at least 1"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].update(Launcher=_worker(j)), "Launcher"),
        (lambda j: j["spec"]["pytorchReplicaSpecs"].pop("Master"), "Master replica is required"),
        (lambda j: j.update(apiVersion="kubeflow.org/v2"),
         "apiVersion: 'kubeflow.org/v2' is not 'kubeflow.org/v1'"),
        (lambda j: _worker(j).pop("template"), "container named 'pytorch'"),
        (lambda j: j["metadata"].update(name="Pretrain"), "metadata/name"),
    ],
)
def test_check_manifest_rejects_broken_manifests(edit: Any, fragment: str) -> None:
    with pytest.raises(UpstreamError) as info:
        check_manifest(_broken(edit))
    message = str(info.value)
    assert fragment in message
    assert message.startswith(f"PyTorchJob {NS}/")
    assert "\n" not in message


def test_pod_check_rejects_a_broken_pod_template() -> None:
    def bad_port(job: dict[str, Any]) -> None:
        _worker(job)["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "23456"

    def unknown_field(job: dict[str, Any]) -> None:
        _worker(job)["template"]["spec"]["serviceAccount_name"] = "x"

    for edit, fragment in ((bad_port, "containerPort"), (unknown_field, "serviceAccount_name")):
        job = _broken(edit)
        check_manifest(job)  # the CRD leaves the pod template to the Pod schema
        with pytest.raises(UpstreamError) as info:
            check_pod_templates(job)
        assert "Worker pod template" in str(info.value)
        assert fragment in str(info.value)
        assert "\n" not in str(info.value)


# --- submit and wait, against a stand-in for the Kubernetes API -----------------------------


def condition(kind: str, reason: str, message: str, status: str = "True") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": "2026-11-22T08:00:00Z"}


CREATED = condition("Created", "PyTorchJobCreated", f"PyTorchJob {NS}/{NAME} is created.")
RUNNING = condition("Running", "PyTorchJobRunning", f"PyTorchJob {NS}/{NAME} is running.")
NOT_RUNNING = {**RUNNING, "status": "False"}
SUCCEEDED = condition("Succeeded", "PyTorchJobSucceeded",
                      f"PyTorchJob {NS}/{NAME} successfully completed.")
FAILED = condition("Failed", "PyTorchJobFailed",
                   f"PyTorchJob {NS}/{NAME} is failed because 1 Worker replica(s) failed.")


def replicas(active: int, succeeded: int = 0, failed: int = 0) -> dict[str, Any]:
    return {"Master": {"active": min(active, 1), "succeeded": min(succeeded, 1)},
            "Worker": {"active": max(active - 1, 0), "succeeded": max(succeeded - 1, 0),
                       "failed": failed}}


TO_SUCCESS = [
    {},
    {"conditions": [CREATED]},
    {"conditions": [CREATED, RUNNING], "replicaStatuses": replicas(2)},
    {"conditions": [CREATED, RUNNING], "replicaStatuses": replicas(2)},
    {"conditions": [CREATED, NOT_RUNNING, SUCCEEDED], "replicaStatuses": replicas(0, 2)},
]
TO_FAILURE = [
    {"conditions": [CREATED]},
    {"conditions": [CREATED, RUNNING], "replicaStatuses": replicas(2)},
    {"conditions": [CREATED, NOT_RUNNING, FAILED], "replicaStatuses": replicas(1, 0, 1)},
]


def api_error(status: int, reason: str, message: str = "") -> ApiException:
    error = ApiException(status=status, reason=reason)
    error.body = json.dumps({"kind": "Status", "status": "Failure", "message": message,
                             "reason": reason, "code": status})
    return error


class StandInApi:
    """Records calls like ``CustomObjectsApi`` and replays a script of job statuses.

    Each read returns the stored job with the next status of ``script`` (the last one is
    kept); ``existing`` pre-creates the job (so create answers 409); ``errors`` maps a call
    number of ``get_namespaced_custom_object`` to an exception raised instead.
    """

    def __init__(self, script: list[dict[str, Any]], existing: dict[str, Any] | None = None,
                 create_error: ApiException | None = None,
                 errors: dict[int, Exception] | None = None) -> None:
        self.script = script
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        if existing is not None:
            self.jobs[(existing["metadata"]["namespace"], existing["metadata"]["name"])] = existing
        self.create_error = create_error
        self.errors = errors or {}
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.reads = 0

    def create_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                        plural: str, body: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", dict(group=group, version=version, namespace=namespace,
                                          plural=plural, body=body)))
        assert (group, version, plural) == ("kubeflow.org", "v1", "pytorchjobs")
        if self.create_error is not None:
            raise self.create_error
        key = (namespace, body["metadata"]["name"])
        if key in self.jobs:
            raise api_error(409, "AlreadyExists",
                            f'pytorchjobs.kubeflow.org "{key[1]}" already exists')
        self.jobs[key] = copy.deepcopy(body)
        return self.jobs[key]

    def get_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                     plural: str, name: str) -> dict[str, Any]:
        self.calls.append(("get", dict(group=group, version=version, namespace=namespace,
                                       plural=plural, name=name)))
        self.reads += 1
        if self.reads in self.errors:
            raise self.errors[self.reads]
        if (namespace, name) not in self.jobs:
            raise api_error(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found')
        job = self.jobs[(namespace, name)]
        step = self.script[min(self.reads - 1, len(self.script) - 1)] if self.script else {}
        job["status"] = copy.deepcopy(step)
        return copy.deepcopy(job)


def test_submit_walks_created_running_succeeded() -> None:
    job, api, lines = make(), StandInApi(TO_SUCCESS), []
    assert submit_and_wait(job, poll_s=0, api=api, log=lines.append) == "Succeeded"

    verb, kwargs = api.calls[0]
    assert verb == "create" and kwargs["namespace"] == NS and kwargs["body"] is job
    assert [v for v, _ in api.calls[1:]] == ["get"] * len(TO_SUCCESS)
    assert lines == [
        f"{WHERE}: created",
        f"{WHERE}: Created (PyTorchJobCreated): PyTorchJob {NS}/{NAME} is created.",
        f"{WHERE}: Running (PyTorchJobRunning): PyTorchJob {NS}/{NAME} is running.",
        f"{WHERE}: Master active=1 succeeded=0 failed=0; Worker active=1 succeeded=0 failed=0",
        f"{WHERE}: Succeeded (PyTorchJobSucceeded): PyTorchJob {NS}/{NAME} successfully "
        "completed.",
        f"{WHERE}: Master active=0 succeeded=1 failed=0; Worker active=0 succeeded=1 failed=0",
    ]


def test_submit_raises_with_the_failing_condition() -> None:
    lines: list[str] = []
    with pytest.raises(UpstreamError) as info:
        submit_and_wait(make(), poll_s=0, api=StandInApi(TO_FAILURE), log=lines.append)
    message = str(info.value)
    assert message == (f"{WHERE} failed (PyTorchJobFailed): PyTorchJob {NS}/{NAME} is failed "
                       "because 1 Worker replica(s) failed.")
    assert any("Worker active=0 succeeded=0 failed=1" in line for line in lines)


def test_submit_attaches_to_the_same_job_after_a_restart() -> None:
    """A re-run step (same name, same spec) follows the job the first run created."""
    job = make()
    api = StandInApi(TO_SUCCESS[2:], existing=copy.deepcopy(job))
    lines: list[str] = []
    assert submit_and_wait(job, poll_s=0, api=api, log=lines.append) == "Succeeded"
    assert lines[0] == f"{WHERE}: already exists with this spec; attaching to it"
    assert [v for v, _ in api.calls[:2]] == ["create", "get"]


def test_submit_refuses_to_attach_to_a_different_job() -> None:
    api = StandInApi(TO_SUCCESS, existing=make(nodes=4))
    with pytest.raises(UpstreamError, match="already exists with a different spec"):
        submit_and_wait(make(nodes=2), poll_s=0, api=api, log=lambda _: None)
    assert [v for v, _ in api.calls] == ["create", "get"]


def test_submit_attaches_to_a_job_that_already_succeeded() -> None:
    job = make()
    api = StandInApi(TO_SUCCESS[-1:], existing=copy.deepcopy(job))
    assert submit_and_wait(job, poll_s=0, api=api, log=lambda _: None) == "Succeeded"


def test_submit_times_out_naming_the_state() -> None:
    api = StandInApi([{"conditions": [CREATED, RUNNING]}])
    with pytest.raises(UpstreamError) as info:
        submit_and_wait(make(), poll_s=0.01, timeout_s=0.05, api=api, log=lambda _: None)
    assert str(info.value).startswith(f"{WHERE} is still Running after 0.05 s")
    assert f"kubectl delete pytorchjob -n {NS} {NAME}" in str(info.value)


@pytest.mark.parametrize(
    ("error", "fragment"),
    [
        (api_error(403, "Forbidden"), "forbidden to create pytorchjobs.kubeflow.org"),
        (api_error(404, "NotFound"), "is the Kubeflow Training Operator installed?"),
        (api_error(422, "Invalid", 'PyTorchJob.kubeflow.org "x" is invalid:\n'
                   "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1"),
         "create failed (422): PyTorchJob.kubeflow.org \"x\" is invalid: spec."),
    ],
)
def test_submit_explains_a_refused_create(error: ApiException, fragment: str) -> None:
    with pytest.raises(UpstreamError) as info:
        submit_and_wait(make(), poll_s=0, api=StandInApi([], create_error=error),
                        log=lambda _: None)
    assert fragment in str(info.value)
    assert str(info.value).startswith(WHERE)
    assert "\n" not in str(info.value)


def test_submit_rides_out_transient_read_errors_but_not_a_deleted_job() -> None:
    flaky = StandInApi(TO_SUCCESS, errors={2: api_error(503, "Service Unavailable"),
                                           3: ConnectionResetError("reset by peer")})
    lines: list[str] = []
    assert submit_and_wait(make(), poll_s=0, api=flaky, log=lines.append) == "Succeeded"
    assert sum("retrying" in line for line in lines) == 2

    deleted = StandInApi(TO_SUCCESS, errors={3: api_error(404, "NotFound")})
    with pytest.raises(UpstreamError, match="was deleted while waiting"):
        submit_and_wait(make(), poll_s=0, api=deleted, log=lambda _: None)

    down = StandInApi(TO_SUCCESS, errors={i: api_error(500, "Internal") for i in range(1, 20)})
    with pytest.raises(UpstreamError, match=r"read failed \(500\)"):
        submit_and_wait(make(), poll_s=0, api=down, log=lambda _: None)


def test_submit_without_cluster_config_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The real kubernetes config loaders, with neither in-cluster env nor a kube config."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-config"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UpstreamError) as info:
        submit_and_wait(make(), poll_s=0, log=lambda _: None)
    assert str(info.value).startswith("no Kubernetes configuration")
    assert "\n" not in str(info.value)


def test_submit_needs_name_and_namespace() -> None:
    job = make()
    del job["metadata"]["namespace"]
    with pytest.raises(UpstreamError, match="metadata.namespace"):
        submit_and_wait(job, api=StandInApi([]), log=lambda _: None)


class _ApiServer(ThreadingHTTPServer):
    """A stand-in Kubernetes API server on loopback for the pytorchjobs resource only."""

    def __init__(self, script: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script = script
        self.jobs: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.reads = 0


class _Handler(BaseHTTPRequestHandler):
    server: _ApiServer
    PREFIX = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"

    def log_message(self, *args: Any) -> None:  # keep pytest output clean
        pass

    def _reply(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(("POST", self.path))
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["name"]
        if self.path != self.PREFIX:
            self._reply(404, {"kind": "Status", "code": 404, "message": "not found"})
        elif name in self.server.jobs:
            self._reply(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists",
                              "message": f'pytorchjobs.kubeflow.org "{name}" already exists'})
        else:
            self.server.jobs[name] = body
            self._reply(201, body)

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests.append(("GET", self.path))
        name = self.path.rsplit("/", 1)[-1]
        if not self.path.startswith(self.PREFIX + "/") or name not in self.server.jobs:
            self._reply(404, {"kind": "Status", "code": 404, "message": "not found"})
            return
        script = self.server.script
        status = script[min(self.server.reads, len(script) - 1)]
        self.server.reads += 1
        self._reply(200, {**self.server.jobs[name], "status": status})


def test_submit_through_the_real_client_and_kubeconfig(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The kubernetes client itself (config loading, REST paths, 409 handling) over HTTP."""
    server = _ApiServer(TO_SUCCESS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        kubeconfig = tmp_path / "config"
        kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "c",
                          "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
            "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "test", "context": {"cluster": "c", "user": "u"}}],
        }))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        job = make()
        assert submit_and_wait(job, poll_s=0, log=lambda _: None) == "Succeeded"
        path = f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
        assert server.requests[0] == ("POST", path)
        assert server.requests[1] == ("GET", f"{path}/{NAME}")
        assert server.jobs[NAME] == job

        # the step's pod restarts and runs again: the real client's 409 leads to attaching
        server.reads = len(TO_SUCCESS) - 1
        lines: list[str] = []
        assert submit_and_wait(job, poll_s=0, log=lines.append) == "Succeeded"
        assert lines[0].endswith("attaching to it")
    finally:
        server.shutdown()
        server.server_close()


def test_pipeline_step_runs_pretraining_as_a_pytorchjob(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pretrain step with nodes=2: it writes the config beside the output, creates a
    job whose pods run ``torchrun ... -m upstream.pretrain <config>``, waits, and returns
    the checkpoint the job wrote. No cluster here: the stand-in API plays the operator, and
    its "pods" are one real pre-training process on the config the job points to."""
    import shlex

    from upstream.pretrain import PretrainConfig, pretrain
    from upstream.pretrain import job as pretrain_job
    from upstream.shards.stage import ShardConfig, shard

    monkeypatch.setenv("UPSTREAM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("UPSTREAM_NAMESPACE", "team-a")
    data = str(tmp_path / "shapes")
    shard(ShardConfig.parse(source="shapes", num_classes=2, samples_per_class=8, image_size=32,
                            output=data, experiment="job"))
    config = PretrainConfig.parse(data=data, output=str(tmp_path / "out"), nodes=2,
                                  method="supervised", epochs=1, batch_size=8, experiment="job")

    class Operator(StandInApi):
        def create_namespaced_custom_object(self, group: str, version: str, namespace: str,
                                            plural: str, body: dict[str, Any]) -> dict[str, Any]:
            job = super().create_namespaced_custom_object(group, version, namespace, plural,
                                                          body)
            check_manifest(body)
            check_pod_templates(body)
            command = body["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"][
                "containers"][0]["command"]
            line = " ".join(command)
            assert "-m upstream.pretrain" in line and body["spec"]["nprocPerNode"] == "1"
            source = shlex.split(line)[-1]
            placed = PretrainConfig.model_validate_json(Path(source).read_text())
            assert placed == config
            pretrain(placed.model_copy(update={"nodes": 1}))  # what the pods would train
            return job

    api = Operator(TO_SUCCESS)
    result = pretrain_job.run(config, "registry.example/upstream:1", api=api, poll_s=0)
    assert result["checkpoint"] == str(tmp_path / "out" / "checkpoint.pt")
    assert result["steps"] == 2 and api.calls[0][1]["namespace"] == "team-a"
    body = api.calls[0][1]["body"]
    assert body["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    # A restarted step finds the same job (same name) and the finished checkpoint.
    again = pretrain_job.run(config, "registry.example/upstream:1", api=api, poll_s=0)
    assert again["checkpoint"] == result["checkpoint"]
