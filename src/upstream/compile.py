"""Byte-deterministic compilation of upstream's pipelines to ``pipelines/compiled/*.yaml``.

kfp serialises dict-valued defaults through protobuf's C++ implementation in an order that
changes between runs; the pure-Python implementation keeps it stable. That choice must be
made before protobuf is first imported, so compilation runs in a child process.
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"


def default_output_dir() -> Path:
    import upstream.pipelines

    return Path(upstream.pipelines.__path__[0]) / "compiled"


def _compile_here(out: Path) -> None:
    from kfp import compiler

    from upstream.pipelines.registry import pipelines

    out.mkdir(parents=True, exist_ok=True)
    for name, (pipeline, _) in pipelines().items():
        compiler.Compiler().compile(pipeline, str(out / f"{name}.yaml"))


def compile_into(out: Path, image: str | None = None) -> None:
    """Compile every pipeline into ``out`` with the pure-Python protobuf.

    Always in a fresh process: the protobuf implementation and the components' image are
    fixed when kfp and the components are first imported.
    """
    env = {**os.environ, ENV: "python"}
    if image:
        env["UPSTREAM_IMAGE"] = image
    else:
        env.pop("UPSTREAM_IMAGE", None)
    code = "import sys; from pathlib import Path; from upstream.compile import _compile_here; " \
           "_compile_here(Path(sys.argv[1]))"
    subprocess.run([sys.executable, "-c", code, str(out)], env=env, check=True)


def compile_all(out: Path, check: bool = False, image: str | None = None) -> list[str]:
    """Write the YAML files into ``out``; with ``check``, only return the stale ones' names."""
    if not check:
        compile_into(out, image)
        return []
    with tempfile.TemporaryDirectory() as tmp:
        compile_into(Path(tmp), image)
        stale = []
        for fresh in sorted(Path(tmp).glob("*.yaml")):
            current = out / fresh.name
            if not current.exists() or not filecmp.cmp(fresh, current, shallow=False):
                stale.append(fresh.name)
        return stale
