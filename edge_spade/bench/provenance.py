"""What made a benchmark result: code version and commit, model and heads hashes, machine, power."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the checkout, for an editable install
RESULT_PATHS = ("benchmarks/results/", "benchmarks/RESULTS.md")


def git_commit(root: Path = PACKAGE_ROOT) -> str | None:
    """The checkout's commit, with "-dirty" when tracked files other than benchmark results differ from
    it; None outside git."""
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    changed = [line[3:] for line in dirty.stdout.splitlines() if line.strip()]
    # results written by earlier benchmarks of a run are outputs, not a change to what is measured
    changed = [path for path in changed if not path.startswith(RESULT_PATHS)]
    return commit.stdout.strip() + ("-dirty" if changed else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def model_record(rt) -> dict:
    """A loaded runtime's model and heads, by name and sha256, and the threads it ran with."""
    from edge_spade.cache import sha256_file

    heads_json = Path(rt.heads_dir) / "heads.json" if rt.heads_dir else None
    return {
        "model": rt.name,
        "model_file": rt.engine.path.name,
        "model_sha256": sha256_file(rt.engine.path),
        "heads_sha256": sha256_file(heads_json) if heads_json and heads_json.is_file() else None,
        "threads": rt.engine.threads,
    }


def power_source() -> dict:
    """Battery level and whether on mains, as psutil sees it (no battery: a desktop, a VM)."""
    try:
        import psutil
    except ImportError:
        return {"battery": None, "note": "psutil not installed"}
    try:
        battery = psutil.sensors_battery()
    except Exception as exc:  # platform-specific failures reading the battery
        return {"battery": None, "note": f"psutil: {exc}"}
    if battery is None:
        return {"battery": None, "on_mains": None, "note": "no battery found"}
    return {"battery": round(battery.percent, 1), "on_mains": battery.power_plugged}


def provenance(models: list[dict], command: str) -> dict:
    try:
        ours = version("edge-spade")
    except PackageNotFoundError:
        ours = None
    return {
        "edge_spade": ours,
        "commit": git_commit(),
        "command": command,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "llama_cpp_python": _version("llama-cpp-python"),
        "power": power_source(),
        "models": models,
    }


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
