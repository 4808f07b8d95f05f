"""The shard stage: tars + manifest, determinism, no-op reruns, clean-up, S3, MLflow."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from upstream import storage
from upstream.data.corruptions import KINDS
from upstream.errors import UpstreamError
from upstream.shards.stage import ShardConfig, data_fingerprint, shard

pytestmark = pytest.mark.usefixtures("tracking_home")


def small(output: str | Path, **kw: Any) -> ShardConfig:
    values: dict[str, Any] = dict(
        source="digits", num_classes=3, samples_per_class=10, image_size=16, shard_size=8
    )
    values.update(kw)
    return ShardConfig.parse(output=str(output), **values)


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_manifest_and_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    m = shard(small(out))
    assert m["num_samples"] == 30 and m["num_classes"] == 3
    assert m["class_names"] == ["zero", "one", "two"]
    assert m["class_counts"] == {"zero": 10, "one": 10, "two": 10}
    assert m["keys"] == ["cls", "json", "png", "txt"]
    assert [s["name"] for s in m["shards"]] == [f"shard-00000{i}.tar" for i in range(4)]
    assert [s["num_samples"] for s in m["shards"]] == [8, 8, 8, 6]
    assert m["fingerprint"] == data_fingerprint(small(out)) and m["image_size"] == 16
    assert m["config"]["source"] == "digits" and m["uri"] == str(out)
    assert m["caption_template"] == "a photo of the digit {label}."
    assert json.loads((out / "manifest.json").read_text()) == m
    for info in m["shards"]:
        data = (out / info["name"]).read_bytes()
        assert info["size"] == len(data)
        assert info["sha256"] == hashlib.sha256(data).hexdigest()

    members = tar_members(out / "shard-000000.tar")
    assert len(members) == 8 * 4
    labels = []
    for i in range(8):
        key = f"{i:06d}"
        assert set(members) >= {f"{key}.{ext}" for ext in ("cls", "json", "png", "txt")}
        label = int(members[f"{key}.cls"])
        meta = json.loads(members[f"{key}.json"])
        assert meta["class_name"] == m["class_names"][label]
        assert meta["source"] == "digits" and meta["split"] == "train"
        assert meta["corruption"] == "none" and isinstance(meta["index"], int)
        assert members[f"{key}.txt"].decode() == f"a photo of the digit {meta['class_name']}."
        img = Image.open(io.BytesIO(members[f"{key}.png"]))
        assert img.size == (16, 16) and img.mode == "RGB"
        labels.append(label)
    assert len(set(labels)) > 1  # shuffled before sharding: classes mix within a shard


def test_same_config_gives_byte_identical_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = shard(small(out))
    before = file_bytes(out)
    shutil.rmtree(out)
    second = shard(small(out))
    assert file_bytes(out) == before
    assert second == first
    other = shard(small(tmp_path / "other", seed=1))
    assert other["shards"][0]["sha256"] != first["shards"][0]["sha256"]


def test_rerun_is_a_noop(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = shard(small(out))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    # A different MLflow experiment does not change the data: still a no-op.
    again = shard(small(out, experiment="elsewhere"))
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_other_config_replaces_old_shards(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(small(out, shard_size=4))  # 8 shards
    m = shard(small(out, shard_size=30))
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "shard-000000.tar",
        "sizes.json",
    ]
    assert m["shards"][0]["num_samples"] == 30


def test_half_written_output_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000009.tar").write_bytes(b"left by a crashed run")
    (out / ".shard-000001.tar.part").write_bytes(b"half a copy")
    (out / "manifest.json").write_text("{damaged")
    m = shard(small(out))
    assert json.loads((out / "manifest.json").read_text()) == m
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json"] + [
        f"shard-00000{i}.tar" for i in range(4)
    ] + ["sizes.json"]


def test_refuses_to_delete_foreign_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    (out / "shard-000000.tar").write_bytes(b"old")
    with pytest.raises(UpstreamError, match=r"not shards \(e\.g\. thesis\.tex\)"):
        shard(small(out))
    assert (out / "thesis.tex").read_text() == "precious"
    assert (out / "shard-000000.tar").read_bytes() == b"old"


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"output": ""}, "output is required"),
        ({"num_classes": 11}, r"digits\) has 10 classes"),
        ({"source": "imagefolder:/no/such/dir"}, "does not exist"),
        ({"source": "torchvision:NoSuchSet"}, "unknown torchvision dataset"),
    ],
)
def test_bad_input_fails_before_touching_output(
    tmp_path: Path, kw: dict[str, Any], message: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard-000003.tar").write_bytes(b"an earlier attempt")
    config = small(kw.pop("output", out), **kw)
    with pytest.raises(UpstreamError, match=message):
        shard(config)
    assert (out / "shard-000003.tar").read_bytes() == b"an earlier attempt"


def test_corrupted_jpg_set_with_own_captions(tmp_path: Path) -> None:
    out = tmp_path / "ood"
    m = shard(
        small(
            out,
            source="shapes",
            num_classes=2,
            samples_per_class=6,
            split="test",
            corruption="mixed",
            severity=4,
            image_format="jpg",
            shard_size=100,
            caption_template="{label}!",
        )
    )
    assert m["keys"] == ["cls", "jpg", "json", "txt"] and m["num_samples"] == 12
    members = tar_members(out / "shard-000000.tar")
    metas = [json.loads(v) for k, v in members.items() if k.endswith(".json")]
    assert {meta["corruption"] for meta in metas} <= set(KINDS)
    assert all(meta["severity"] == 4 and meta["split"] == "test" for meta in metas)
    captions = {v.decode() for k, v in members.items() if k.endswith(".txt")}
    assert captions == {"circle!", "square!"}
    jpg = next(v for k, v in members.items() if k.endswith(".jpg"))
    assert Image.open(io.BytesIO(jpg)).format == "JPEG"


def test_fractal_shards(tmp_path: Path) -> None:
    m = shard(small(tmp_path / "f", source="fractals", num_classes=2, samples_per_class=5))
    assert m["class_counts"] == {"fractal-00": 5, "fractal-01": 5}
    assert len(m["shards"]) == 2


def test_mlflow_run_records_the_set(tmp_path: Path) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from upstream import tracking

    m = shard(small(tmp_path / "out", experiment="shard-test"))
    mlflow.set_tracking_uri(tracking.tracking_uri())
    exp = mlflow.get_experiment_by_name("shard-test")
    assert exp is not None
    (run,) = mlflow.search_runs([exp.experiment_id], output_format="list")
    metrics = run.data.metrics
    assert metrics.pop("images_per_s") > 0
    assert metrics == {"num_samples": 30.0, "num_classes": 3.0, "skipped": 0.0,
                       "resumed_shards": 0.0}
    assert run.data.tags["upstream.source"] == "digits"
    assert run.data.tags["upstream.split"] == "train"
    assert run.data.params["shard.num_classes"] == "3"
    client = MlflowClient(tracking.tracking_uri())
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "manifest.json",
        "examples.png",
    }
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read_text()
    )
    assert logged == m


def test_s3_output(moto_s3: str) -> None:
    out = f"s3://{moto_s3}/sets/digits"
    m = shard(small(out))
    files = sorted(u.rsplit("/", 1)[1] for u in storage.list_files(out))
    assert files == ["manifest.json"] + [f"shard-00000{i}.tar" for i in range(4)] + ["sizes.json"]
    assert storage.read_json(f"{out}/manifest.json") == m
    data = storage.read_bytes(f"{out}/shard-000001.tar")
    assert hashlib.sha256(data).hexdigest() == m["shards"][1]["sha256"]
    # Rerun: nothing is written again (the same object versions, here the same ETags).
    client = storage.s3_client()
    etag = client.head_object(Bucket=moto_s3, Key="sets/digits/manifest.json")["LastModified"]
    assert shard(small(out)) == m
    assert (
        client.head_object(Bucket=moto_s3, Key="sets/digits/manifest.json")["LastModified"] == etag
    )
    # A stray shard from a crashed run under another config is cleared by the next write.
    storage.write_bytes(f"{out}/shard-000042.tar", b"junk")
    m2 = shard(small(out, shard_size=30))
    files = sorted(u.rsplit("/", 1)[1] for u in storage.list_files(out))
    assert files == ["manifest.json", "shard-000000.tar", "sizes.json"]
    assert Counter(m2["class_counts"].values()) == {10: 3}


def test_s3_missing_bucket_fails_fast(moto_s3: str) -> None:
    with pytest.raises(UpstreamError, match="bucket 'no-such-bucket' does not exist"):
        shard(small("s3://no-such-bucket/x"))
