"""`upstream run PIPELINE --host URL` submits to a Kubeflow Pipelines backend.

No Kubeflow backend can run on this machine, so kfp.Client is replaced by a recorder: the
test checks what upstream hands the client (the real pipeline object, validated arguments,
the experiment), not Kubeflow itself.
"""

from __future__ import annotations

from typing import Any

import pytest

from upstream.errors import UpstreamError
from upstream.pipelines import launch
from upstream.pipelines.transfer import transfer


class RecordingClient:
    calls: list[dict[str, Any]] = []

    def __init__(self, host: str) -> None:
        self.host = host

    def create_run_from_pipeline_func(self, pipeline: Any, arguments: dict[str, Any],
                                      experiment_name: str) -> Any:
        self.calls.append({"host": self.host, "pipeline": pipeline, "arguments": arguments,
                           "experiment": experiment_name})

        class Result:
            run_id = "run-123"

        return Result()


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> type[RecordingClient]:
    import kfp

    RecordingClient.calls = []
    monkeypatch.setattr(kfp, "Client", RecordingClient)
    return RecordingClient


def test_submit_hands_the_pipeline_and_arguments(recorder: type[RecordingClient]) -> None:
    message = launch.submit("transfer", {"finetune_shots": 10, "experiment": "study-a"},
                            "http://kfp.example:8888")
    assert message == "submitted run run-123 to http://kfp.example:8888"
    (call,) = recorder.calls
    assert call["pipeline"] is transfer
    assert call["arguments"] == {"finetune_shots": 10, "experiment": "study-a"}
    assert call["experiment"] == "study-a"


def test_submit_validates_before_contacting_the_backend(
    recorder: type[RecordingClient], tmp_path: Any
) -> None:
    with pytest.raises(UpstreamError, match="finetune: invalid shots"):
        launch.submit("transfer", {"finetune_shots": -1}, "http://kfp.example:8888")
    with pytest.raises(UpstreamError, match="nope"):
        launch.submit("transfer", {"downstream_source": f"imagefolder:{tmp_path}/nope"},
                      "http://kfp.example:8888")
    assert recorder.calls == []


def test_a_study_is_submitted_with_its_spec_text(recorder: type[RecordingClient],
                                                 tmp_path: Any) -> None:
    from upstream.pipelines.study import study

    spec = tmp_path / "s.yaml"
    text = (launch_root() / "studies" / "entezari-mini.yaml").read_text()
    spec.write_text(text)
    launch.submit("study", {"spec": str(spec)}, "http://kfp.example:8888")
    (call,) = recorder.calls
    assert call["pipeline"] is study
    assert call["arguments"] == {"spec": text}  # the text: the steps cannot read this machine
    spec.write_text(text.replace("methods: [supervised, clip]", "methods: [supervised, byol]"))
    with pytest.raises(UpstreamError, match=r"study spec .*methods\.1"):
        launch.submit("study", {"spec": str(spec)}, "http://kfp.example:8888")
    assert len(recorder.calls) == 1


def launch_root() -> Any:
    from pathlib import Path

    return Path(__file__).resolve().parents[1]
