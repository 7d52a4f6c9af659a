"""Helpers shared by the benchmark scripts: data paths, progress, saving JSON and plots."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


def save_json(obj: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=1))
    logging.getLogger("benchmarks").info("saved %s", out)
    return out


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
