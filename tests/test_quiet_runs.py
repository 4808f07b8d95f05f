"""Quiet local pipeline runs (upstream.pipelines.progress) and stage commands whose stdout is
their JSON result alone.

The pipelines here are real kfp.local runs of trivial lightweight components (SubprocessRunner,
``use_venv=False``, so each step is a subprocess of this Python, ~0.1 s). No ``from __future__
import annotations``: kfp reads the components' annotations as types.
"""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from kfp import dsl, local

from upstream.errors import UpstreamError
from upstream.pipelines import progress

IMAGE = "python:3.11"  # explicit, so that kfp neither warns about its default nor about the image
START = re.compile(r"^step (\S+) running$")
END = re.compile(r"^step (\S+) (succeeded|failed|cached) in \d+\.\d s \(cache (hit|miss|off)")


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def say(word: str) -> str:
    print(f"say-output {word}")
    return word


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def shout(word: str) -> str:
    import sys

    print(f"shout-stderr {word}", file=sys.stderr)
    if word == "boom":
        raise ValueError("shout refuses to say boom")
    return word.upper()


@dsl.pipeline(name="quiet-probe")
def probe(word: str = "hi") -> str:
    first = say(word=word)
    return shout(word=first.output).output


@dsl.pipeline(name="quiet-loop")
def loop(word: str = "hi") -> str:
    with dsl.ParallelFor(["a", "b", "c"]) as item:
        say(word=item)
    return shout(word=word).output


def _run(root: Path, pipeline: object, caching: bool = False, **arguments: str):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root),
               raise_on_error=True, enable_caching=caching)
    quiet = progress.QuietRun()
    task = quiet.run(pipeline, arguments)
    return quiet, task


def _lines(err: str) -> tuple[list[str], list[tuple[str, str, str]]]:
    starts = [m.group(1) for ln in err.splitlines() if (m := START.match(ln))]
    ends = [m.groups() for ln in err.splitlines() if (m := END.match(ln))]
    return starts, ends


def test_a_line_per_step_start_and_end_and_the_logs_in_files(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root_logger = logging.getLogger()
    handlers = root_logger.handlers[:]
    quiet, task = _run(tmp_path, probe, word="hi")
    out, err = capfd.readouterr()

    assert task.output == "HI"
    assert out == ""  # neither kfp's logs nor the steps' output reach stdout (fd level)
    starts, ends = _lines(err)
    assert sorted(starts) == ["say", "shout"]
    assert sorted(ends) == [("say", "succeeded", "off"), ("shout", "succeeded", "off")]
    assert "Got executor_input" not in err and "say-output" not in err
    assert re.search(r"quiet-probe: 2 steps \(0 cached, 0 failed\) in \d+ s; step logs in ", err)

    assert quiet.run_dir is not None and quiet.run_dir.parent == tmp_path
    assert quiet.run_dir.name.startswith("quiet-probe-")
    say_log = (quiet.logs_dir / "say.log").read_text()
    shout_log = (quiet.logs_dir / "shout.log").read_text()
    assert "say-output hi" in say_log and "Got executor_input" in say_log
    assert "Executing task 'say'" in say_log  # kfp's own records, without the colour codes
    assert "shout-stderr hi" in shout_log and "say-output" not in shout_log
    assert "Running pipeline" in (quiet.logs_dir / progress.PIPELINE_LOG).read_text()
    assert [s.status for s in quiet.steps] == ["succeeded", "succeeded"]
    assert all(s.seconds > 0 and s.returncode == 0 for s in quiet.steps)

    # Everything patched is put back.
    from kfp.local import logging_utils, subprocess_task_handler
    from kfp.local.orchestrator import task_executor

    assert root_logger.handlers == handlers
    assert task_executor.execute_single_task.__module__ == task_executor.__name__
    assert subprocess_task_handler.run_local_subprocess.__module__ == \
        subprocess_task_handler.__name__
    assert logging_utils.indented_print.__module__ == logging_utils.__name__


def test_a_failed_step_is_named_with_its_log_tail(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UpstreamError) as raised:
        _run(tmp_path, probe, word="boom")
    out, err = capfd.readouterr()

    message = str(raised.value)
    assert "\n" not in message
    # The cause is in the one line too, not only in the tail above it.
    assert message.startswith("step shout of quiet-probe failed (exit code 1): "
                              "ValueError: shout refuses to say boom; log: ")
    assert message.endswith(str(Path("logs") / "shout.log"))
    assert out == ""
    starts, ends = _lines(err)
    assert sorted(starts) == ["say", "shout"]
    assert ("shout", "failed", "off") in ends
    tail = err[err.index("--- the last "):]
    assert "shout-stderr boom" in tail
    assert "ValueError: shout refuses to say boom" in tail
    assert "say-output" not in tail


def test_a_second_run_with_caching_reports_the_cache_hits(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    first, _ = _run(tmp_path, probe, caching=True, word="hi")
    assert [s.cache for s in first.steps] == ["miss", "miss"]
    capfd.readouterr()
    second, task = _run(tmp_path, probe, caching=True, word="hi")
    _, err = capfd.readouterr()

    assert task.output == "HI"
    assert second.run_dir != first.run_dir
    assert [(s.status, s.cache, s.returncode) for s in second.steps] == \
        [("cached", "hit", None)] * 2
    _, ends = _lines(err)
    assert sorted(ends) == [("say", "cached", "hit"), ("shout", "cached", "hit")]
    assert "(2 cached, 0 failed)" in err
    assert "cache hit" in (second.logs_dir / "say.log").read_text()


def test_parallel_for_iterations_have_their_own_lines_logs_and_count(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    quiet, _ = _run(tmp_path, loop, word="hi")
    _, err = capfd.readouterr()

    names = sorted(s.name for s in quiet.steps)
    assert len(names) == 4 and names[-1] == "shout"
    iterations = names[:3]
    assert all(re.fullmatch(r"for-loop-\d+-iteration-[012]/say-?\d*", n) for n in iterations)
    starts, ends = _lines(err)
    assert sorted(starts) == names and sorted(e[0] for e in ends) == names
    words = {(quiet.logs_dir / f"{n}.log").read_text().count(f"say-output {w}") for n in iterations
             for w in "abc"}
    assert words == {0, 1}  # each iteration's log holds its own word only
    assert "quiet-loop: 4 steps" in err


def test_the_bar_counts_steps_known_so_far(tmp_path: Path) -> None:
    """The static count has the loop body once; the loop's start adds the other iterations."""
    import io

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path),
               raise_on_error=True)
    stream = io.StringIO()
    progress.QuietRun(stream=stream, bar=True).run(loop, {})
    text = stream.getvalue()
    assert "0/2 " in text and "/4 " in text and "4/4 " in text


def test_another_kfp_version_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kfp

    monkeypatch.setattr(kfp, "__version__", "2.99.0")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    with pytest.raises(UpstreamError, match="2.99.0"):
        progress.QuietRun().run(probe, {})


# --- stage commands: stdout is the JSON result alone ------------------------------------------


def _upstream(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # The installed entry point, as a user runs it: fd-level output is covered too.
    exe = Path(sys.executable).parent / "upstream"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_a_stage_command_prints_its_json_alone(tmp_path: Path) -> None:
    env = {"UPSTREAM_HOME": str(tmp_path / "home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    out = tmp_path / "shards"
    result = _upstream("shard", "--source", "digits", "--samples-per-class", "3", "--output",
                       str(out), env=env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # the whole of stdout
    assert summary["uri"] == str(out) and summary["num_samples"] == 30
    assert "wrote 30 samples" in result.stderr


def test_stdout_to_stderr_covers_python_fd_and_child_output() -> None:
    code = (
        "import os, subprocess, sys\n"
        "from upstream.cli import _stdout_to_stderr\n"
        "keep = sys.stdout\n"
        "with _stdout_to_stderr():\n"
        "    print('from print')\n"
        "    keep.write('from a kept reference\\n')\n"
        "    os.write(1, b'from fd 1\\n')\n"
        "    subprocess.run([sys.executable, '-c', 'print(\"from a child\")'])\n"
        "print('{\"result\": 1}')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"result": 1}
    for text in ("from print", "from a kept reference", "from fd 1", "from a child"):
        assert text in result.stderr


@pytest.mark.integration
def test_mlflow_view_run_lines_go_to_stderr(local_services, tmp_path: Path) -> None:
    """MLflow prints "🏃 View run ... at: ..." to stdout when a run on a tracking server ends."""
    result = _upstream("shard", "--source", "digits", "--samples-per-class", "2", "--output",
                       str(tmp_path / "shards"), "--experiment", "quiet-runs",
                       env={"UPSTREAM_HOME": str(local_services.home)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_samples"] == 20
    assert "View run" in result.stderr
