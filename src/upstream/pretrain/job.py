"""Multi-node pre-training from a pipeline step: the step creates a Kubeflow ``PyTorchJob``
that runs torchrun in every pod, waits for it, and reads the result from the checkpoint.

The job's name derives from the config's output location (itself derived from the config's
fingerprint), so a restarted step attaches to the job it created rather than starting a
second one (:func:`upstream.pretrain.pytorchjob.submit_and_wait`). Every pod reads the config
from ``{output}/job-config.json`` and gets the S3 and MLflow settings from the chart's Secret
and ConfigMap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from upstream import storage
from upstream.errors import UpstreamError
from upstream.pretrain import pytorchjob
from upstream.pretrain.stage import PretrainConfig, _completed

#: What the Helm chart installs (charts/upstream): the S3 Secret, the settings ConfigMap and
#: the service account whose Role may create PyTorchJobs.
S3_SECRET = "upstream-s3"
SETTINGS_CONFIG_MAP = "upstream-settings"
SERVICE_ACCOUNT = "default-editor"
NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def namespace() -> str:
    if os.environ.get("UPSTREAM_NAMESPACE"):
        return os.environ["UPSTREAM_NAMESPACE"]
    if NAMESPACE_FILE.exists():
        return NAMESPACE_FILE.read_text().strip()
    return "kubeflow"


def job_manifest(config: PretrainConfig, config_uri: str, image: str) -> dict[str, Any]:
    """The PyTorchJob that trains ``config`` on ``config.nodes`` × ``procs_per_node``."""
    return pytorchjob.pytorchjob_manifest(
        name=pytorchjob.stable_job_name("pretrain", config.output),
        namespace=namespace(),
        image=image,
        command=pytorchjob.torchrun_command(["upstream.pretrain", config_uri]),
        nodes=config.nodes,
        gpus_per_node=config.procs_per_node,
        cpu=os.environ.get("UPSTREAM_JOB_CPU", "8"),
        memory=os.environ.get("UPSTREAM_JOB_MEMORY", "64Gi"),
        env={},
        env_from_secrets=[S3_SECRET],
        env_from_config_maps=[SETTINGS_CONFIG_MAP],
        service_account=SERVICE_ACCOUNT,
        labels={"app.kubernetes.io/part-of": "upstream", "upstream/stage": "pretrain"},
    )


def run(
    config: PretrainConfig, image: str, api: Any = None, poll_s: float = 10
) -> dict[str, Any]:
    """Create (or attach to) the job, wait for it, return the pretrain result."""
    if not config.output:
        raise UpstreamError("pretrain: a multi-node job needs an output location")
    config_uri = storage.join(config.output, "job-config.json")
    storage.write_bytes(config_uri, config.model_dump_json().encode())
    manifest = job_manifest(config, config_uri, image)
    pytorchjob.submit_and_wait(manifest, api=api, poll_s=poll_s)
    done = _completed(storage.join(config.output, "checkpoint.pt"), config)
    if done is None:
        raise UpstreamError(f"pretrain: job {manifest['metadata']['name']} succeeded but "
                            f"wrote no checkpoint at {config.output}")
    return done
