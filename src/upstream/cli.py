"""The ``upstream`` command line.

Every stage command's options are derived from that stage's config model (name, type,
default and help come from the pydantic field), and every ``upstream run PIPELINE`` option from
the pipeline's parameters, so nothing is declared twice. Errors are one line on stderr and a
non-zero exit (2 for bad input).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from upstream.config import StageConfig, literal_choices
from upstream.errors import UpstreamError
from upstream.logs import setup_logging


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    """A bad option (an unknown name, a value of the wrong type, a missing one) as one line
    ``error: …`` and exit 2, like every other bad input, instead of typer's boxed message."""
    try:
        yield
    except typer.TyperException as e:
        # The bare command's help (no_args_is_help) is shown as it is, not as an error.
        if type(e).__name__ == "NoArgsIsHelpError":
            raise
        ctx = getattr(e, "ctx", None)
        names = []
        while ctx is not None and ctx.parent is not None:
            names.append(ctx.info_name or "")
            ctx = ctx.parent
        where = " ".join(["upstream", *reversed(names)])
        message = " ".join(e.format_message().split())
        typer.echo(f"error: {where}: {message}", err=True)
        raise typer.Exit(2 if e.exit_code == 2 else e.exit_code or 1) from None


class _Group(TyperGroup):
    """The root command: usage errors of it and of every subcommand as one line."""

    def make_context(self, info_name: str | None, args: list[str],
                     parent: Any = None, **extra: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    help="upstream: controlled studies of how pre-training data shapes transfer learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_Group,
)
services_app = typer.Typer(help="The local S3 server and MLflow server.", no_args_is_help=True)
run_app = typer.Typer(help="Run a pipeline locally (--local) or on Kubeflow (--host).",
                      no_args_is_help=True)
app.add_typer(services_app, name="services")
app.add_typer(run_app, name="run")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _option(name: str, annotation: Any, default: Any, help_text: str) -> inspect.Parameter:
    choices = literal_choices(annotation)
    if choices is not None:
        annotation = type(choices[0])
        help_text += f" [choices: {', '.join(map(str, choices))}]"
    required = default is ... or default is None and annotation is not Any
    option = typer.Option(... if required else default, "--" + name.replace("_", "-"),
                          help=help_text, show_default=not required)
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def _guarded(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from upstream import faults, tracking

        try:
            return func(*args, **kwargs)
        except UpstreamError as e:
            tracking.fail_fast()  # the process ends: MLflow's exit-time flushes, one try each
            raise fail(str(e)) from None
        except KeyboardInterrupt as e:
            tracking.fail_fast()
            signum = getattr(e, "signum", signal.SIGINT)
            raise fail(f"interrupted by {signal.Signals(signum).name}", 128 + signum) from None
        except Exception as e:
            message = faults.describe(e)
            if message is None:
                raise
            tracking.fail_fast()
            raise fail(message) from None

    return wrapper


def _use_local_services() -> None:
    """Point clients at the local services when they are up and nothing else is set."""
    from upstream import services

    info = services.status()
    if info is not None:
        services.apply_env(info)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """Send everything bound for stdout to stderr while the block runs.

    Two levels, because output reaches stdout two ways: Python writes through ``sys.stdout``
    (MLflow's "🏃 View run ... at: ..." lines are ``sys.stdout.write`` when a run ends), which
    ``redirect_stdout`` catches; subprocesses and native code write to file descriptor 1, which
    is pointed at descriptor 2 (only when ``sys.stdout`` is that descriptor: under typer's
    CliRunner it is a buffer, and the process's fd 1 is not ours to move). Whatever was written
    to the original ``sys.stdout`` object (a handler that kept a reference to it) is flushed
    before fd 1 comes back, so it lands on stderr too.
    """
    out = sys.stdout
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        fd = -1
    saved = -1
    out.flush()
    if fd == 1:
        saved = os.dup(1)
        os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        out.flush()
        sys.stderr.flush()
        if saved != -1:
            os.dup2(saved, 1)
            os.close(saved)


def stage_command(config_cls: type[StageConfig], run: Callable[[Any], Any], summary: str) -> None:
    """Register ``upstream <stage>`` with one option per config field.

    A stage's stdout is its JSON result alone, so that ``upstream shard ... | jq`` and scripts
    can parse it whole; logging, progress bars, MLflow's messages and any subprocess's output
    go to stderr (see ``_stdout_to_stderr``).
    """

    def command(**values: Any) -> None:
        with _stdout_to_stderr():
            setup_logging()
            config = config_cls.parse(**values)
            _use_local_services()
            result = run(config)
            text = json.dumps(_brief(result), indent=2, default=str)
        typer.echo(text)

    params = [
        _option(name, f.annotation, f.default if not f.is_required() else ..., f.description or "")
        for name, f in config_cls.model_fields.items()
    ]
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__name__ = config_cls.stage
    command.__doc__ = summary
    app.command(name=config_cls.stage, help=summary)(_guarded(command))


_BULKY = ("shards", "config", "confusion_matrix", "per_class_f1", "keys", "class_names",
          "interventions", "skipped", "kshot", "caption_templates", "sizes", "selected",
          "cells", "sets", "per_class", "lineage")


def _brief(result: Any) -> Any:
    """A result without its bulky parts (shard lists, confusion matrices, per-set scores)."""
    if isinstance(result, dict):
        return {
            k: (_brief_summary(v) if k == "summary" and isinstance(v, dict) else _brief(v))
            for k, v in result.items()
            if k not in _BULKY
        }
    if isinstance(result, list):
        return [_brief(v) for v in result]
    return result


def _brief_summary(summary: dict[str, Any]) -> dict[str, Any]:
    # An evaluation's summary holds a metric per corrupted set; the headline ones have no dot.
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()
            if "." not in k}


def _register_stages() -> None:
    from upstream import evaluate, finetune, pretrain, report
    from upstream.shards.stage import ShardConfig, shard

    stage_command(ShardConfig, shard,
                  "Write a source as WebDataset shards plus manifest.json.")
    stage_command(pretrain.PretrainConfig, pretrain.pretrain,
                  "Pre-train an image encoder (clip, simclr or supervised) on shards.")
    stage_command(finetune.FinetuneConfig, finetune.finetune,
                  "Fine-tune over a grid of modes (lp, ft, lp-ft, zeroshot, zeroshot-ft, "
                  "scratch) × k shots × seeds × learning rates, each chosen on validation.")
    stage_command(evaluate.CorruptConfig, evaluate.corrupt,
                  "Turn a test set into ImageNet-C's corruption suite (15 corruptions × 5 "
                  "severities, stored as shard sets).")
    stage_command(evaluate.EvaluateConfig, evaluate.evaluate,
                  "Evaluate fine-tuned models (files or grids) on ID and OOD test shards.")
    stage_command(report.ReportConfig, report.report,
                  "Report a study from MLflow: accuracy vs k, OOD vs ID, effective "
                  "robustness, significance, every experiment.")


@app.command("compile")
@_guarded
def compile_cmd(
    output_dir: Path = typer.Option(None, "--output-dir", help="Folder for the YAML files "
                                    "(default: pipelines/compiled in the source tree)."),
    check: bool = typer.Option(False, "--check", help="Exit 1 if a checked-in YAML is stale."),
    image: str = typer.Option("", "--image", help="Image the components run in (default: "
                              "ghcr.io/upstream-ml/upstream:0.1.0, built from images/Dockerfile)."),
) -> None:
    """Compile every pipeline to YAML (byte-deterministic)."""
    from upstream.compile import compile_all, default_output_dir

    out = output_dir or default_output_dir()
    stale = compile_all(out, check=check, image=image or None)
    if check and stale:
        raise fail(f"stale compiled pipelines: {', '.join(stale)} (run `upstream compile`)", 1)
    typer.echo(f"{'checked' if check else 'wrote'} pipelines in {out}")


_KFP_HOST = typer.Option(..., "--host", envvar="KF_PIPELINES_ENDPOINT",
                         help="Kubeflow Pipelines API URL (e.g. http://localhost:8888 through "
                         "a port-forward of svc/ml-pipeline).")
_KFP_NAMESPACE = typer.Option("", "--namespace", help="Kubernetes namespace (multi-user "
                              "Kubeflow: your profile's); empty: the backend's default.")
_KFP_AUTH = ("The API token is read from $KF_PIPELINES_TOKEN, else from the file named by "
             "$KF_PIPELINES_SA_TOKEN_PATH (or kfp's in-cluster token file), and sent as "
             "'Authorization: Bearer'; it is never printed. A host that does not answer its "
             "healthz within 5 s is an error.")


@app.command("upload", help="Upload a compiled pipeline to Kubeflow Pipelines: a new "
             "pipeline, or a new version of it (named --version, else PIPELINE-<sha256 of "
             "the YAML, 12 hex digits>; re-uploading the same YAML changes nothing). Prints "
             "the pipeline and version ids. " + _KFP_AUTH)
@_guarded
def upload_cmd(
    pipeline: str = typer.Argument(..., help="Pipeline name (e.g. transfer)."),
    host: str = _KFP_HOST,
    version: str = typer.Option("", "--version", help="Name of the new version (default: "
                                "PIPELINE-<sha256 prefix of the YAML>)."),
    namespace: str = _KFP_NAMESPACE,
) -> None:
    from upstream.pipelines import kubeflow

    result = kubeflow.upload(pipeline, host, version=version or None,
                             namespace=namespace or None)
    typer.echo(json.dumps(result, indent=2))


@app.command("submit", help="Start a run of a pipeline on Kubeflow Pipelines (its compiled "
             "YAML inline) with the parameters given; the others keep the YAML's defaults. "
             "Values are checked against the parameters' types and validated before the "
             "backend is contacted. " + _KFP_AUTH)
@_guarded
def submit_cmd(
    pipeline: str = typer.Argument(..., help="Pipeline name (e.g. transfer)."),
    host: str = _KFP_HOST,
    param: list[str] = typer.Option([], "--param", help="NAME=VALUE of a pipeline parameter "
                                    "(repeatable; lists and dicts as JSON)."),
    spec: Path = typer.Option(None, "--spec", help="Study spec file whose text becomes the "
                              "pipeline's `spec` parameter (pipelines with one only)."),
    experiment: str = typer.Option("", "--experiment", help="KFP experiment of the run "
                                   "(default: the run's `experiment` parameter)."),
    namespace: str = _KFP_NAMESPACE,
) -> None:
    from upstream.pipelines import kubeflow

    result = kubeflow.submit(pipeline, host, param, spec_file=spec,
                             experiment=experiment or None, namespace=namespace or None)
    typer.echo(json.dumps(result, indent=2))


def _describe_services(info: Any) -> str:
    return "\n".join([
        f"S3 (SeaweedFS): {info.s3_endpoint}   data root: {info.data_root}",
        f"MLflow UI:      {info.ui_url}",
        f"state and logs: {info.services_dir}",
        "clients: upstream commands use these automatically; other tools need the "
        "variables printed by `upstream services env`",
    ])


@services_app.command("up")
@_guarded
def services_up() -> None:
    """Start the local S3 server (SeaweedFS) and MLflow server, if not running."""
    from upstream import services

    info = services.up()
    typer.echo(_describe_services(info))


@services_app.command("down")
@_guarded
def services_down() -> None:
    """Stop the local services."""
    from upstream import services

    services.down()
    typer.echo("local services stopped")


@services_app.command("env")
@_guarded
def services_env() -> None:
    """Print shell `export` lines for the running services (includes the S3 keys)."""
    from upstream import services

    info = services.status()
    if info is None:
        raise fail("local services are not running (start them with `upstream services up`)", 3)
    for key, value in services.env(info).items():
        typer.echo(f"export {key}={value}")


@services_app.command("status")
@_guarded
def services_status() -> None:
    """Say whether the local services run, and where."""
    from upstream import services

    info = services.status()
    if info is None:
        typer.echo("local services are not running (start them with `upstream services up`)")
        raise typer.Exit(3)
    typer.echo(_describe_services(info))


study_app = typer.Typer(help="Study specs: what a spec expands to, and its checks.",
                        no_args_is_help=True)
app.add_typer(study_app, name="study")


def _study_plan(spec_file: str, data_root: str, work_root: str) -> tuple[Any, dict[str, Any]]:
    from upstream.study import plan as study_plan
    from upstream.study import spec as study_spec

    if not Path(spec_file).is_file() and "://" not in spec_file:
        raise UpstreamError(f"study spec {spec_file}: no such file")
    spec, text = study_spec.load(spec_file)
    plan = study_plan.build(spec, data_root, work_root, text, spec_file)
    counts = study_plan.check_sizes(plan, text, spec_file)
    return plan, counts


_SPEC_ARG = typer.Argument(..., help="The study spec (a .yaml file).")
_DATA_ROOT_OPT = typer.Option("s3://upstream/data", "--data-root",
                              help="Where the study's shards go (as the pipeline's data_root).")
_WORK_ROOT_OPT = typer.Option("s3://upstream/runs", "--work-root",
                              help="Where its models go (as the pipeline's work_root).")


@study_app.command("plan")
@_guarded
def study_plan_cmd(
    spec_file: str = _SPEC_ARG,
    data_root: str = _DATA_ROOT_OPT,
    work_root: str = _WORK_ROOT_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    units: bool = typer.Option(False, "--units", help="Also list every unit and its output."),
) -> None:
    """Print the units a spec expands to (after sharing) and an estimate of compute time."""
    from upstream.study import plan as study_plan

    plan, counts = _study_plan(spec_file, data_root, work_root)
    summary = study_plan.summary(plan, counts)
    if units or as_json:
        summary["unit_list"] = [{"kind": u.kind, "id": u.key, "output": u.output,
                                 "used_by": u.names}
                                for k in study_plan.KINDS for u in plan.units[k]]
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(study_plan.render(summary))


@study_app.command("validate")
@_guarded
def study_validate_cmd(
    spec_file: str = _SPEC_ARG,
    data_root: str = _DATA_ROOT_OPT,
    work_root: str = _WORK_ROOT_OPT,
) -> None:
    """Check a spec without running anything: fields, names, the grid, sources, k per class."""
    plan, _ = _study_plan(spec_file, data_root, work_root)
    n = sum(len(v) for v in plan.units.values())
    typer.echo(f"ok: {spec_file} is a valid study ({n} units)")


def _register_pipelines() -> None:
    from upstream.pipelines.registry import pipelines

    for name, (pipeline, params) in pipelines().items():
        _register_pipeline(name, pipeline, params)


def _register_pipeline(name: str, pipeline: Any, params: list[Any]) -> None:
    def command(
        *,
        local: bool,
        host: str,
        stop_services: bool,
        **values: Any,
    ) -> None:
        setup_logging()
        from upstream.pipelines import launch

        if local == bool(host):
            raise UpstreamError("choose one of --local (run here) or --host URL (Kubeflow)")
        if local:
            summary = launch.run_local(name, values, stop_services=stop_services)
            typer.echo(summary)
        else:
            typer.echo(launch.submit(name, values, host))

    opts = [
        inspect.Parameter("local", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--local", help="Run here through "
                          "kfp.local against the local services (started if needed).")),
        inspect.Parameter("host", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                          default=typer.Option("", "--host", help="Kubeflow Pipelines API URL "
                          "to submit the run to.")),
        inspect.Parameter("stop_services", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                          default=typer.Option(False, "--stop-services", help="With --local: "
                          "stop the local services at the end (they stay up by default so that "
                          "the MLflow UI can be browsed).")),
    ]
    for p in params:
        if p.name == "spec":  # a study: the spec file is the command's argument
            opts.append(inspect.Parameter(
                "spec", inspect.Parameter.KEYWORD_ONLY, annotation=str,
                default=typer.Argument(p.default, help="The study spec: a .yaml file (its "
                                       "text is passed to the run) or a shipped study's "
                                       "name.")))
        else:
            opts.append(_option(p.name, p.type, p.default, p.description))
    command.__signature__ = inspect.Signature(opts)  # type: ignore[attr-defined]
    doc = (pipeline.description or name).strip()
    run_app.command(name=name, help=doc)(_guarded(command))


_register_stages()
_register_pipelines()


def main() -> None:
    try:
        app()
    except UpstreamError as e:  # raised outside a command (e.g. while registering)
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
