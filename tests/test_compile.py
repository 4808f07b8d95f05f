"""`upstream compile` is byte-deterministic and the checked-in YAML is current."""

from __future__ import annotations

from pathlib import Path

from upstream.compile import compile_all, default_output_dir


def test_compile_twice_is_byte_identical(tmp_path: Path) -> None:
    compile_all(tmp_path / "a")
    compile_all(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.yaml"))
    assert names == ["transfer.yaml"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_checked_in_yaml_is_current() -> None:
    stale = compile_all(default_output_dir(), check=True)
    assert stale == [], f"run `upstream compile`: {stale} differ from their sources"


def test_check_reports_a_stale_file(tmp_path: Path) -> None:
    compile_all(tmp_path)
    (tmp_path / "transfer.yaml").write_text("stale\n")
    assert compile_all(tmp_path, check=True) == ["transfer.yaml"]


def test_image_can_be_chosen_at_compile_time(tmp_path: Path) -> None:
    compile_all(tmp_path, image="registry.example/team/upstream:dev")
    text = (tmp_path / "transfer.yaml").read_text()
    assert "image: registry.example/team/upstream:dev" in text
    assert "ghcr.io/upstream-ml/upstream" not in text


def test_pretrain_pod_gets_its_gpus_and_a_shared_memory_volume() -> None:
    """The pretrain step asks for ``pretrain_gpus`` of ``pretrain_accelerator`` (run-time
    parameters) and mounts a memory-backed /dev/shm for its DataLoader workers."""
    import yaml

    docs = list(yaml.safe_load_all((default_output_dir() / "transfer.yaml").read_text()))
    executors = docs[0]["deploymentSpec"]["executors"]
    accelerator = executors["exec-pretrain"]["container"]["resources"]["accelerator"]
    assert "pretrain_gpus" in accelerator["resourceCount"]
    assert "pretrain_accelerator" in accelerator["resourceType"]
    platform = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-pretrain"]["emptyDirMounts"] == [
        {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm"}
    ]
    assert "emptyDirMounts" not in platform["exec-shard"]
    inputs = docs[0]["root"]["inputDefinitions"]["parameters"]
    assert inputs["pretrain_gpus"]["defaultValue"] == 0
