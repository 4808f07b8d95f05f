"""The Helm chart renders to valid Kubernetes manifests that match what the pipelines mount.

helm-python-sdk embeds Helm's engine (no helm binary, no cluster needed); the manifests are
checked against the Kubernetes schemas with kubernetes-validate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from helm_python import chart

from upstream.pipelines import transfer

CHART = Path(__file__).resolve().parents[1] / "charts" / "upstream"
KEYS = {"s3": {"accessKeyId": "AKIDEXAMPLE", "secretAccessKey": "wJalrEXAMPLEKEY"}}
K8S_VERSION = "1.30"


def render(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kind/name → manifest."""
    with chart.Chart.load(CHART) as c:
        files = c.render(values, name="study", namespace="team-a")
    docs: dict[str, dict[str, Any]] = {}
    for path, text in files.items():
        if not path.endswith(".yaml"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def test_lint_has_no_errors() -> None:
    result = chart.lint(CHART, KEYS, strict=True)
    assert result["errors"] == []
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def test_manifests_are_valid_kubernetes() -> None:
    docs = render(KEYS)
    assert set(docs) == {
        "ConfigMap/upstream-settings", "Secret/upstream-s3", "PersistentVolumeClaim/study-mlflow",
        "Deployment/study-mlflow", "Service/study-mlflow", "Role/study-pytorchjobs",
        "RoleBinding/study-pytorchjobs",
    }
    for doc in docs.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_names_and_keys_match_the_compiled_pipeline() -> None:
    docs = render(KEYS)
    settings = docs[f"ConfigMap/{transfer.SETTINGS_CONFIG_MAP}"]["data"]
    assert set(settings) == set(transfer.SETTINGS_ENV)
    assert settings["MLFLOW_TRACKING_URI"] == "http://study-mlflow.team-a.svc.cluster.local:5000"
    secret = docs[f"Secret/{transfer.S3_SECRET}"]["stringData"]
    assert set(secret) == set(transfer.SECRET_ENV)
    # the keys are in the Secret only
    assert "wJalrEXAMPLEKEY" not in yaml.safe_dump(settings)


def test_mlflow_accepts_its_cluster_host_name() -> None:
    args = render(KEYS)["Deployment/study-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    allowed = next(a for a in args["args"] if a.startswith("--allowed-hosts="))
    assert "study-mlflow.team-a.svc.cluster.local:5000" in allowed


def test_existing_secret_is_used_not_created() -> None:
    docs = render({"s3": {"existingSecret": "team-a-s3"}})
    assert not any(k.startswith("Secret/") for k in docs)
    container = docs["Deployment/study-mlflow"]["spec"]["template"]["spec"]["containers"][0]
    assert container["envFrom"] == [{"secretRef": {"name": "team-a-s3"}}]


def test_missing_keys_fail_with_a_message() -> None:
    with pytest.raises(Exception, match="s3.accessKeyId"):
        render({})


def test_external_mlflow() -> None:
    docs = render({**KEYS, "mlflow": {"enabled": False, "externalUri": "https://mlflow.corp"}})
    assert "Deployment/study-mlflow" not in docs
    assert docs["ConfigMap/upstream-settings"]["data"]["MLFLOW_TRACKING_URI"] == "https://mlflow.corp"
