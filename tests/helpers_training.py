"""Fixtures for the training-stage tests (models, pretrain, finetune, evaluate).

Load with ``pytest_plugins = ["helpers_training"]`` in a test module. The shard sets, the
pre-trained checkpoint and the fine-tuned model are made once per session (tiny sizes: the
whole chain takes a few seconds on two CPU cores), in a temporary home with its own SQLite
MLflow store; each test module points ``UPSTREAM_HOME`` and ``MLFLOW_TRACKING_URI`` there
(``training_env``) and gets them restored afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EXPERIMENT = "upstream-tests"


@pytest.fixture(scope="session")
def training_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("training-home")


@contextlib.contextmanager
def env_for(home: Path) -> Iterator[Path]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UPSTREAM_HOME", str(home))
        # One store per session: creating MLflow's tables costs ~1.5 s a database.
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.delenv("UPSTREAM_RUN_GROUP", raising=False)
        yield home


@pytest.fixture(scope="module")
def training_env(training_home: Path) -> Iterator[Path]:
    """The session's temporary home and MLflow store, in the environment for one module."""
    with env_for(training_home):
        yield training_home


def _shard(home: Path, name: str, **kw: Any) -> str:
    from upstream.shards.stage import ShardConfig, shard

    out = str(home / "data" / name)
    with env_for(home):
        shard(ShardConfig.parse(output=out, experiment=EXPERIMENT, **kw))
    return out


@pytest.fixture(scope="session")
def shapes_train(training_home: Path) -> str:
    """A tiny separable set: 4 rendered shapes × 16 images, 32 px, in 4 shards."""
    return _shard(training_home, "shapes-train", source="shapes", num_classes=4,
                  samples_per_class=16, image_size=32, shard_size=16)


@pytest.fixture(scope="session")
def digits_train(training_home: Path) -> str:
    """scikit-learn digits, 30 training images per class (300), 32 px."""
    return _shard(training_home, "digits-train", source="digits", samples_per_class=30,
                  image_size=32, shard_size=100)


@pytest.fixture(scope="session")
def digits_test(training_home: Path) -> str:
    """The digits test split, 20 per class (200): the in-distribution test set."""
    return _shard(training_home, "digits-test", source="digits", split="test",
                  samples_per_class=20, image_size=32)


@pytest.fixture(scope="session")
def digits_test_rotated(training_home: Path) -> str:
    """The same test images rotated: the out-of-distribution test set."""
    return _shard(training_home, "digits-test-rot", source="digits", split="test",
                  samples_per_class=20, image_size=32, corruption="rotate", severity=3)


@pytest.fixture(scope="session")
def pretrained_digits(training_home: Path, digits_train: str) -> dict[str, Any]:
    """Supervised tiny-rn pre-training on the digits (3 epochs, ~30 steps)."""
    from upstream.pretrain import PretrainConfig, pretrain

    with env_for(training_home):
        return pretrain(PretrainConfig.parse(
            data=digits_train, output=str(training_home / "pretrained"), method="supervised",
            epochs=3, batch_size=32, warmup_steps=3, experiment=EXPERIMENT,
        ))


@pytest.fixture(scope="session")
def finetuned_digits(
    training_home: Path, pretrained_digits: dict[str, Any], digits_train: str
) -> dict[str, Any]:
    """LP-FT of the pre-trained tower on 10 shots per class of the digits."""
    from upstream.finetune import FinetuneConfig, finetune

    with env_for(training_home):
        result = finetune(FinetuneConfig.parse(
            pretrained=pretrained_digits["checkpoint"], data=digits_train,
            output=str(training_home / "finetuned"), modes="lp-ft", shots="10", epochs=3,
            min_steps=0, batch_size=32, experiment=EXPERIMENT,
        ))
    return result | {"model": result["selected"][0]["model"]}


@pytest.fixture(scope="session")
def pretrained_clip_digits(training_home: Path, digits_train: str) -> dict[str, Any]:
    """CLIP tiny-rn pre-training on the digits' templated captions (3 epochs)."""
    from upstream.pretrain import PretrainConfig, pretrain

    with env_for(training_home):
        return pretrain(PretrainConfig.parse(
            data=digits_train, output=str(training_home / "pretrained-clip"), method="clip",
            epochs=3, batch_size=32, warmup_steps=3, experiment=EXPERIMENT,
        ))


class MlflowStore:
    """What the tests read back from the session's MLflow store."""

    experiment = EXPERIMENT

    @staticmethod
    def _client() -> Any:
        from mlflow.tracking import MlflowClient

        from upstream import tracking

        return MlflowClient(tracking.tracking_uri())

    def run(self, run_id: str) -> Any:
        """The run (``.data.params``, ``.data.metrics``, ``.data.tags``)."""
        return self._client().get_run(run_id)

    def artifacts(self, run_id: str) -> set[str]:
        return {a.path for a in self._client().list_artifacts(run_id)}

    def history(self, run_id: str, key: str) -> list[float]:
        """Every value logged for metric ``key``, in step order."""
        metrics = self._client().get_metric_history(run_id, key)
        return [m.value for m in sorted(metrics, key=lambda m: m.step)]

    def logged_models(self, run_id: str) -> list[str]:
        """Names of the models the run logged (MLflow 3 keeps them beside the run's artifacts)."""
        import mlflow

        from upstream import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri())
        found = mlflow.search_logged_models(
            experiment_ids=[self.run(run_id).info.experiment_id],
            filter_string=f"source_run_id = '{run_id}'",
            output_format="list",
        )
        return [m.name for m in found]

    def no_run_in(self, experiment: str) -> bool:
        """True when ``experiment`` holds no run (a stage that failed fast started none)."""
        import mlflow

        from upstream import tracking

        mlflow.set_tracking_uri(tracking.tracking_uri())
        exp = mlflow.get_experiment_by_name(experiment)
        return exp is None or mlflow.search_runs([exp.experiment_id]).empty


@pytest.fixture
def mlflow_store(training_env: Path) -> MlflowStore:
    return MlflowStore()
