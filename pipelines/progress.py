"""Quiet ``kfp.local`` pipeline runs: a line per step and a progress bar on stderr, each step's
log in a file.

kfp 2.17's local runner is loud: it logs through the *root* logger (``logging.info``), inside
``logging_utils.local_logger_context``, which swaps the root logger's handlers for one printing
to stdout on every step; and its SubprocessRunner pipes each step's stdout and stderr into this
process and ``print``s every line (the executor input, outputs, the step's own output) under a
process-wide rebinding of ``builtins.print`` (``indented_print``). With ParallelFor the steps run
in two threads and all of that interleaves. :class:`QuietRun` replaces those few pieces for the
length of one pipeline call (kfp is pinned, and the patches check its version):

- ``local_logger_context``, ``indented_print`` and ``print_horizontal_line`` do nothing, and
  the root logger gets one handler that writes each record to the log file of the step whose
  thread logged it (thread-local), or to the run's ``_pipeline.log``;
- ``subprocess_task_handler.run_local_subprocess`` starts the step with its stdout and stderr on
  that step's log file (file descriptors, so native and child-process output lands there too);
- ``task_executor.execute_single_task`` (every step, cached or not, in plain and control-flow
  DAGs) is wrapped to time the step and print its start and end lines;
- ``ParallelExecutor.execute_parallel_tasks`` is wrapped to learn how many iterations a loop has;
- ``executor_input_utils.get_local_pipeline_resource_name`` is wrapped to learn the run folder.

Where things go: kfp.local puts a run under ``<pipeline_root>/<pipeline>-<timestamp>/`` and a
step's outputs under ``<task>/`` in it (``<loop>-iteration-<i>/<task>/`` inside a ParallelFor);
a step's log is ``<run folder>/logs/<task>.log`` (``logs/<loop>-iteration-<i>/<task>.log``),
and what kfp logs outside any step is in ``logs/_pipeline.log`` (kfp task names never start with
an underscore, so it cannot clash with a step). The lines on stderr::

    step shard-2 running
    step shard-2 succeeded in 3.1 s (cache miss)
    step shard cached in 0.0 s (cache hit)
    step finetune failed in 41.7 s (cache off, exit code 1); log: .../logs/finetune.log

"cache off" when local caching is off (``local.init(enable_caching=False)``, the default) or
the task opts out. A failed step's last lines follow its end line at once; the run goes on with
the steps that do not depend on it (as kfp does), and then :meth:`QuietRun.run` raises
:class:`UpstreamError` naming the failed steps.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from upstream.errors import UpstreamError

#: The kfp release whose local runner the patches below were written against (and read).
KFP_VERSION = "2.17.0"
#: How much of a failed step's log is shown on stderr.
TAIL_LINES = 40
PIPELINE_LOG = "_pipeline.log"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: kfp.local's cache-hit message, logged by task_executor.execute_single_task.
_CACHE_HIT = re.compile(r"^Task \S+ cache hit \(key=")
_local = threading.local()
_active = threading.Lock()


@dataclass
class Step:
    """One executed task of a run."""

    name: str  #: the task name, ``<loop>-iteration-<i>/<task>`` inside a ParallelFor
    log: Path
    cache: str = "off"  #: "off", "miss" or "hit"
    status: str = "running"  #: running, succeeded, failed or cached
    seconds: float = 0.0
    returncode: int | None = None  #: of the step's subprocess (None: none ran, e.g. cached)
    started: float = field(default_factory=time.monotonic, repr=False)


def _current() -> Step | None:
    return getattr(_local, "step", None)


class _RouteToStepLogs(logging.Handler):
    """Each record to the log of the step running in the logging thread, else the run's log."""

    def __init__(self, run: QuietRun) -> None:
        super().__init__(logging.INFO)
        self.run = run
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = _ANSI.sub("", self.format(record))
            step = _current()
            if step is not None:
                if _CACHE_HIT.match(_ANSI.sub("", record.getMessage())):
                    step.cache = "hit"
                _append(step.log, text)
                return
            if self.run.run_dir is not None:
                _append(self.run.logs_dir / PIPELINE_LOG, text)
            # Outside a step kfp only warns about the pipeline itself (an unresolved input,
            # an orchestration exception), which the console should show.
            if record.levelno >= logging.WARNING:
                self.run._write(text)
        except Exception:  # noqa: BLE001 - logging must not break the run
            self.handleError(record)


def _append(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text + "\n")


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    text = warnings.formatwarning(message, category, filename, lineno, line).rstrip()
    logging.getLogger("py.warnings").warning(text)


def _count_steps(dag: Any, components: Any) -> int:
    """Executor tasks in a DAG spec, nested DAGs (loop bodies, conditions) counted once."""
    n = 0
    for task in dag.tasks.values():
        component = components[task.component_ref.name]
        n += (_count_steps(component.dag, components)
              if component.WhichOneof("implementation") == "dag" else 1)
    return n


def _tail(path: Path, lines: int) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return []


#: The last line of a Python traceback: ``module.Name: message``.
_EXCEPTION_LINE = re.compile(r"(?:[A-Za-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception)): (.+)")


def _cause(path: Path) -> str | None:
    """Why a step failed, from its log: the message of the last exception it printed (an
    UpstreamError's message alone: it is already the one-line error the stage would print)."""
    found = None
    for line in _tail(path, 2000):
        match = _EXCEPTION_LINE.fullmatch(line.strip())
        if match:
            found = match
    if found is None:
        return None
    kind, message = found.groups()
    text = message if kind == "UpstreamError" else f"{kind}: {message}"
    return text[:500]


class QuietRun:
    """Runs one kfp.local pipeline call quietly; see the module docstring for what it patches.

    ``stream`` (default: stderr at the time of the run) gets the step lines, the bar and the
    final line; ``bar`` shows the tqdm bar (default: only when ``stream`` is a terminal, since
    a bar's redraws are noise in a log file). The bar's total is the steps *known so far*:
    every executor task of the pipeline spec, each ParallelFor body counted once until its loop
    starts and then once per iteration, conditional branches counted as taken; so it can grow
    while loops start, and it is set to the steps done when the run ends (a skipped branch or
    an empty loop never ran). After :meth:`run`, ``run_dir`` is the run's folder and ``steps``
    the steps in the order they started.
    """

    def __init__(self, *, stream: TextIO | None = None, bar: bool | None = None,
                 tail_lines: int = TAIL_LINES) -> None:
        self.stream = stream
        self.bar_wanted = bar
        self.tail_lines = tail_lines
        self.run_dir: Path | None = None
        self.steps: list[Step] = []
        self.seconds = 0.0
        self._lock = threading.Lock()
        self._names: set[str] = set()
        self._bar: Any = None
        self._root = Path()

    @property
    def logs_dir(self) -> Path:
        if self.run_dir is None:
            raise ValueError("the run has not started")
        return self.run_dir / "logs"

    def failed(self) -> list[Step]:
        return [s for s in self.steps if s.status == "failed"]

    def run(self, pipeline: Callable[..., Any], arguments: dict[str, Any]) -> Any:
        """Call ``pipeline(**arguments)`` (after ``kfp.local.init``); return what it returns.

        Raises UpstreamError, one line naming the step(s), when a step failed (their log tails
        are on the stream by then), or naming the pipeline when kfp failed outside any step.
        """
        import kfp
        from kfp.local import config
        from tqdm import tqdm

        if kfp.__version__ != KFP_VERSION:
            raise UpstreamError(
                f"upstream.pipelines.progress patches kfp {KFP_VERSION}'s local runner, but kfp "
                f"{kfp.__version__} is installed: check the patches against it and update "
                "KFP_VERSION")
        config.LocalExecutionConfig.validate()
        self.stream = self.stream or sys.stderr
        self.run_dir, self.steps, self._names = None, [], set()  # a QuietRun may run again
        self._root = Path(config.LocalExecutionConfig.instance.pipeline_root)
        name = getattr(pipeline, "name", None) or getattr(pipeline, "__name__", "pipeline")
        spec = getattr(pipeline, "pipeline_spec", None)
        total = _count_steps(spec.root.dag, spec.components) if spec is not None else None
        show = (self.bar_wanted if self.bar_wanted is not None
                else getattr(self.stream, "isatty", lambda: False)())
        if not _active.acquire(blocking=False):
            raise UpstreamError("another quiet local run is in progress in this process")
        t0 = time.monotonic()
        error: BaseException | None = None
        try:
            self._bar = tqdm(total=total, desc=name, unit="step", file=self.stream,
                             disable=not show, dynamic_ncols=True)
            with self._patched():
                try:
                    result = pipeline(**arguments)
                except Exception as e:  # noqa: BLE001 - turned into one line below
                    error = e
        finally:
            self.seconds = time.monotonic() - t0
            if self._bar is not None:
                self._bar.total = self._bar.n
                self._bar.refresh()
                self._bar.close()
            _active.release()
        failed = self.failed()
        cached = sum(s.status == "cached" for s in self.steps)
        where = f"; step logs in {self.logs_dir}" if self.run_dir is not None else ""
        self._write(f"{name}: {len(self.steps)} steps ({cached} cached, {len(failed)} failed) "
                    f"in {self.seconds:.0f} s{where}")
        if failed:
            first = failed[0]
            names = ", ".join(s.name for s in failed)
            code = f" (exit code {first.returncode})" if first.returncode else ""
            cause = _cause(first.log)
            because = f": {cause}" if cause else ""
            raise UpstreamError(
                f"step {names} of {name} failed{code}{because}; log: {first.log}"
                if len(failed) == 1 else
                f"steps {names} of {name} failed; the first one ({first.name}){because}; "
                f"its log: {first.log}"
            ) from error
        if error is not None:
            raise UpstreamError(f"local run of {name} failed: {_ANSI.sub('', str(error))}") \
                from error
        return result

    # --- console ---------------------------------------------------------------------------

    def _write(self, line: str) -> None:
        from tqdm import tqdm

        # tqdm.write clears and redraws the bar around the line, under tqdm's own lock.
        tqdm.write(line, file=self.stream)

    def _start(self, task_name: str, resource_name: str, cache_on: bool) -> Step:
        # The part of the resource name after the run folder is the loop iteration, if any.
        _, _, nested = resource_name.partition("/")
        label = f"{nested}/{task_name}" if nested else task_name
        with self._lock:
            base, i = label, 2
            while label in self._names:  # the same task name in a nested, non-loop pipeline
                label, i = f"{base}~{i}", i + 1
            self._names.add(label)
            run_dir = self.run_dir or self._root / resource_name.split("/")[0]
            step = Step(label, run_dir / "logs" / f"{label}.log",
                        cache="miss" if cache_on else "off")
            self.steps.append(step)
        step.log.parent.mkdir(parents=True, exist_ok=True)
        self._write(f"step {label} running")
        return step

    def _end(self, step: Step, ok: bool) -> None:
        step.seconds = time.monotonic() - step.started
        step.status = ("cached" if step.cache == "hit" else "succeeded") if ok else "failed"
        detail = [f"cache {step.cache}"]
        if step.returncode:
            detail.append(f"exit code {step.returncode}")
        line = f"step {step.name} {step.status} in {step.seconds:.1f} s ({', '.join(detail)})"
        if not ok:
            line += f"; log: {step.log}"
        with self._lock:
            self._bar.update(1)
            counts = {s: sum(x.status == s for x in self.steps) for s in ("cached", "failed")}
            self._bar.set_postfix({k: v for k, v in counts.items() if v}, refresh=False)
        self._write(line)
        if not ok:
            tail = _tail(step.log, self.tail_lines)
            # One write, so that the bar is redrawn once, below the whole tail.
            self._write("\n".join([f"--- the last {len(tail)} lines of {step.log} ---",
                                   *("    " + text for text in tail), "---"]))

    # --- the patches -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        from kfp.local import cache as kfp_cache
        from kfp.local import executor_input_utils, logging_utils, subprocess_task_handler
        from kfp.local.orchestrator import enhanced_dag_orchestrator, task_executor

        run = self
        execute_single_task = task_executor.execute_single_task
        execute_parallel_tasks = enhanced_dag_orchestrator.ParallelExecutor.execute_parallel_tasks
        resource_name = executor_input_utils.get_local_pipeline_resource_name
        signature = inspect.signature(execute_single_task)

        def quiet_execute_single_task(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs).arguments
            task_spec = bound["task_spec"]
            cache_on = (kfp_cache.get_local_cache() is not None
                        and task_spec.caching_options.enable_cache)
            step = run._start(bound["task_name"], bound["pipeline_resource_name"], cache_on)
            _local.step = step
            ok = False
            try:
                outputs, task_status = execute_single_task(*args, **kwargs)
                ok = task_status.name == "SUCCESS"
                return outputs, task_status
            except BaseException:
                logging.exception("the step raised")
                raise
            finally:
                _local.step = None
                run._end(step, ok)

        def quiet_execute_parallel_tasks(executor: Any, tasks: Any, *args: Any,
                                         **kwargs: Any) -> Any:
            components = kwargs.get("components")
            if components is not None and tasks and run._bar.total is not None:
                body = components[tasks[0][1].component_ref.name]
                per = (_count_steps(body.dag, components)
                       if body.WhichOneof("implementation") == "dag" else 1)
                with run._lock:  # the static count had the body once
                    run._bar.total += per * (len(tasks) - 1)
                    run._bar.refresh()
            return execute_parallel_tasks(executor, tasks, *args, **kwargs)

        def quiet_resource_name(pipeline_name: str) -> str:
            name = resource_name(pipeline_name)
            if run.run_dir is None:
                run.run_dir = run._root / name
            return name

        def run_local_subprocess(full_command: list[str],
                                 env_vars: dict[str, str] | None = None) -> int:
            step = _current()
            if step is None:  # not a step of this run (kfp's single-component calls)
                return original_subprocess(full_command, env_vars)
            # Unbuffered, so that a step's prints and its traceback keep their order in the log.
            env = {**os.environ, **(env_vars or {}), "PYTHONUNBUFFERED": "1"}
            with open(step.log, "a", encoding="utf-8") as out:
                out.write("--- the step's output ---\n")
                out.flush()
                step.returncode = subprocess.call(full_command, stdout=out,
                                                  stderr=subprocess.STDOUT, env=env)
                out.write(f"--- exit code {step.returncode} ---\n")
            return step.returncode

        original_subprocess = subprocess_task_handler.run_local_subprocess
        patches = [
            (logging_utils, "local_logger_context", contextlib.nullcontext),
            (logging_utils, "indented_print", contextlib.nullcontext),
            (logging_utils, "print_horizontal_line", lambda: None),
            (subprocess_task_handler, "run_local_subprocess", run_local_subprocess),
            (task_executor, "execute_single_task", quiet_execute_single_task),
            (enhanced_dag_orchestrator.ParallelExecutor, "execute_parallel_tasks",
             quiet_execute_parallel_tasks),
            (executor_input_utils, "get_local_pipeline_resource_name", quiet_resource_name),
        ]
        root = logging.getLogger()
        saved = [(obj, attr, obj.__dict__[attr]) for obj, attr, _ in patches]
        saved_logging = root.level, root.handlers[:]
        saved_showwarning = warnings.showwarning
        handler = _RouteToStepLogs(self)
        try:
            for obj, attr, new in patches:
                setattr(obj, attr, new)
            root.handlers = [handler]
            root.setLevel(logging.INFO)
            # Warnings kfp raises for a step (settings that do nothing locally) into its log.
            warnings.showwarning = _log_warning
            yield
        finally:
            warnings.showwarning = saved_showwarning
            root.handlers = saved_logging[1]
            root.setLevel(saved_logging[0])
            for obj, attr, old in saved:
                setattr(obj, attr, old)
