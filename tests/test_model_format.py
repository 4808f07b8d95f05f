"""Models go to MLflow as torch.export archives, which load without unpickling anything; a
pickle planted in a logged model's artifacts is refused instead of run."""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import mlflow
import pytest
import torch

from upstream import models, tracking
from upstream.errors import UpstreamError

pytestmark = pytest.mark.usefixtures("tracking_home")


class _Payload:
    """What a replaced artifact would carry: code that runs when it is unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.mkdir, (str(self.marker),)


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory, tracking_home: Path) -> tuple[str, Path]:
    """A tiny classifier logged as upstream logs models; its URI and a local copy."""
    mlflow.set_tracking_uri(tracking.tracking_uri())
    # Artifacts under the test's home (a new experiment's default would be ./mlruns).
    mlflow.set_experiment(experiment_id=tracking.ensure_experiment("model-format"))
    encoder = models.build_image_encoder("upstream-tiny-rn")
    model = models.Classifier(encoder, 3)
    with mlflow.start_run() as run:
        models.log_mlflow_model(model, encoder.image_size, 3)
    uri = f"runs:/{run.info.run_id}/model"
    local = Path(mlflow.artifacts.download_artifacts(
        uri, dst_path=str(tmp_path_factory.mktemp("logged"))))
    return uri, local


def test_logged_model_is_a_pickle_free_export(logged: tuple[str, Path]) -> None:
    uri, local = logged
    data = local / "data"
    assert (data / "model.pt2").is_file() and not (data / "model.pth").exists()
    with zipfile.ZipFile(data / "model.pt2") as archive:
        names = archive.namelist()
    assert not any(n.endswith(".pkl") for n in names), names
    model = models.load_mlflow_model(uri)
    assert isinstance(model, torch.fx.GraphModule)  # a graph, not a class of upstream's
    with torch.no_grad():
        assert model(torch.rand(5, 3, 32, 32)).shape == (5, 3)


def test_a_planted_pickle_is_refused_not_run(logged: tuple[str, Path], tmp_path: Path) -> None:
    _, local = logged
    planted = tmp_path / "planted"
    shutil.copytree(local, planted)
    marker = tmp_path / "code-ran"
    # MLflow's loader takes model.pth (pickle) over model.pt2 whenever the file is there.
    (planted / "data" / "model.pth").write_bytes(pickle.dumps(_Payload(marker)))
    (planted / "data" / "pickle_module_info.txt").write_text("pickle")
    with pytest.raises(UpstreamError, match=rf"^model {planted} was not loaded: .*pickle") as e:
        models.load_mlflow_model(str(planted))
    assert "\n" not in str(e.value)
    assert not marker.exists()
