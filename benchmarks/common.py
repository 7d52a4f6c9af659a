"""Helpers shared by the benchmark scripts: data paths, progress, provenance, saving JSON and plots."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path

from edge_spade.bench import provenance as bench_provenance
from edge_spade.bench.provenance import cpu_model, model_record  # noqa: F401 (re-exported to the scripts)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
CALIBRATION = ROOT / "benchmarks" / "calibration"  # calibration reports and lens baselines of the shipped heads


def data_path(name: str) -> Path:
    """A path as given, else relative to ../shared/data (where the benchmark sets live)."""
    p = Path(name)
    return p if p.exists() else SHARED_DATA / name


def progress(iterable, total: int, desc: str):
    """tqdm when installed (huggingface-hub brings it), else plain."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)


def git_commit() -> str | None:
    return bench_provenance.git_commit(ROOT)


_STARTED_AT = None  # (commit, date) when the benchmark process started: what it ran, not what is there at the end


def started() -> tuple[str | None, str]:
    global _STARTED_AT
    if _STARTED_AT is None:
        _STARTED_AT = (git_commit(), datetime.now(UTC).isoformat(timespec="seconds"))
    return _STARTED_AT


def provenance(models: list[dict] | None = None) -> dict:
    """What made a result: code version and commit, model and heads hashes, machine, threads, command."""
    from importlib.metadata import version

    commit, date = started()
    return {
        "edge_spade": version("edge-spade"),
        "commit": commit,
        "command": command_line(),
        "date": date,
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "models": models or [],
    }


def command_line() -> str:
    """The command as typed: `python -m benchmarks.<name> ...` for a benchmark module."""
    script = Path(sys.argv[0])
    if script.suffix == ".py" and script.parent.name == "benchmarks":
        return " ".join(["python -m", f"benchmarks.{script.stem}", *sys.argv[1:]])
    return " ".join(sys.argv)


def save_json(obj: dict, out: str | Path, runtimes: list | None = None) -> Path:
    """Write a result with its provenance (benchmarks/report.py refuses results without one).

    `runtimes`: the loaded models the result was measured on; a run that closed its own puts
    their `model_record`s under the result's "models" key instead.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    obj = dict(obj)
    models = [model_record(rt) for rt in runtimes or []] + obj.pop("models", [])
    obj = {"provenance": provenance(models), **obj}
    out.write_text(json.dumps(obj, indent=1))
    logging.getLogger("benchmarks").info("saved %s", out)
    return out


def llama_cpp_python(rt, flash_attn: bool = False):
    """llama-cpp-python's `Llama` on a loaded runtime's model file, with its threads and the engine's
    buffer choice (the same kernels, no AMX crash): what a user would run instead of us."""
    from llama_cpp import Llama

    from edge_spade.engine import llama_cpp_python_buffers

    with llama_cpp_python_buffers():
        return Llama(
            str(rt.engine.path),
            n_ctx=1024,
            n_batch=1024,
            n_ubatch=1024,
            n_threads=rt.engine.threads,
            n_threads_batch=rt.engine.threads,
            flash_attn=flash_attn,
            verbose=False,
        )


def pyplot():
    """matplotlib's pyplot on a headless backend, or None (install edge-spade[plots])."""
    try:
        import matplotlib
    except ImportError:
        logging.getLogger("benchmarks").warning("matplotlib not installed: no PNG (pip install 'edge-spade[plots]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


started()  # on import, before any work: the commit and time the run started from
