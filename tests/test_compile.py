"""`upstream compile` is byte-deterministic and the checked-in YAML is current."""

from __future__ import annotations

from pathlib import Path

from upstream.compile import compile_all, default_output_dir


def test_compile_twice_is_byte_identical(tmp_path: Path) -> None:
    compile_all(tmp_path / "a")
    compile_all(tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").glob("*.yaml"))
    assert names == ["study.yaml", "transfer.yaml"]
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


def test_study_pipeline_fans_out_per_level_and_takes_a_spec() -> None:
    """One compiled ``study`` runs any spec: the spec is a string parameter (the shipped
    entezari-mini, by name, by default), each level a ParallelFor over its plan step's list,
    the report collects every evaluation, caching is on for every step but the report, and
    the pretrain pods get their GPUs and a memory-backed /dev/shm."""
    import yaml

    docs = list(yaml.safe_load_all((default_output_dir() / "study.yaml").read_text()))
    spec, platform = docs[0], docs[1]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["spec"]["parameterType"] == "STRING"
    assert params["spec"]["defaultValue"] == "entezari-mini"
    loops = {name: task for name, task in spec["root"]["dag"]["tasks"].items()
             if "parameterIterator" in task}
    assert len(loops) == 4
    for task in loops.values():
        assert task["iteratorPolicy"]["parallelismLimit"] == 16
    tasks = spec["root"]["dag"]["tasks"]
    report = tasks["study-report"]
    assert report["cachingOptions"] == {}  # enableCache false is left out of the YAML
    evaluations = report["inputs"]["parameters"]["evaluations"]
    assert evaluations["taskOutputParameter"]["producerTask"].startswith("for-loop-")
    plans = [t for name, t in tasks.items() if name.startswith("study-plan")]
    assert len(plans) == 4 and all(t["cachingOptions"].get("enableCache") for t in plans)
    pretrain_dag = next(c for c in spec["components"].values()
                        if "study-pretrain" in c.get("dag", {}).get("tasks", {}))
    assert pretrain_dag["dag"]["tasks"]["study-pretrain"]["cachingOptions"]["enableCache"]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-study-pretrain"]["emptyDirMounts"][0]["mountPath"] == "/dev/shm"
    resources = spec["deploymentSpec"]["executors"]["exec-study-pretrain"]["container"]
    assert "accelerator" in resources["resources"]
    text = (default_output_dir() / "study.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" in text and "secretKey" in text  # from the Secret, by name
