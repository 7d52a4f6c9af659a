"""A benchmark result in the forms people read: a terminal table, Markdown to paste into an
issue or a post, and a PNG (latency CDF per mode, energy per answer per mode)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = (
    ("mode", "mode"),
    ("p50 ms", "p50_ms"),
    ("p95 ms", "p95_ms"),
    ("p99 ms", "p99_ms"),
    ("answers/s", "answers_per_s"),
    ("CPU s/answer", "cpu_s_per_answer"),
    ("peak RSS MB", "peak_rss_mb"),
    ("agreement", "agreement_with_full"),
    ("kappa", "kappa_with_full"),
    ("J/answer", "energy_j_per_answer"),
)


def rows(result: dict) -> list[list[str]]:
    out = []
    for mode, stats in result["modes"].items():
        out.append([mode if k == "mode" else _fmt(stats.get(k)) for _, k in COLUMNS])
    return out


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _notes(result: dict) -> list[str]:
    p = result["provenance"]
    model = p["models"][0]
    energy = result["energy"]
    notes = [
        f"{model['model']} ({model['model_file']}), {model['threads']} threads, {p['cpu']}, {p['os']}",
        f"set {result['questions']['set']}: {result['questions']['answered']} questions answered in every mode",
    ]
    exit_mode = result["modes"].get("exit", {})
    if "exit_share" in exit_mode:
        notes.append(f"exit: {exit_mode['exit_share']:.0%} of answers stopped early")
    for name, s in result["speedups"].items():
        fast, slow = name.split("_vs_")
        notes.append(f"{fast} against {slow}: {s['median']:.2f}x by median, {s['total']:.2f}x by total time")
    if energy["source"]:
        notes.append(f"energy: {energy['detail']} ({energy['schedule']})")
    else:
        notes.append(f"energy: not measured: {energy['unavailable']}")
    if result["interrupted"]:
        notes.append("interrupted: figures cover the questions answered before Ctrl-C")
    return notes


def table(result: dict) -> str:
    """The terminal summary."""
    header = [name for name, _ in COLUMNS]
    body = rows(result)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, "", *_notes(result)])


def markdown(result: dict) -> str:
    p = result["provenance"]
    header = [name for name, _ in COLUMNS]
    lines = [
        f"## edge-spade bench: {p['models'][0]['model']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        *("| " + " | ".join(r) + " |" for r in rows(result)),
        "",
        *(f"- {n}" for n in _notes(result)),
    ]
    if result["by_kind"]:
        lines += [
            "",
            "| kind | " + " | ".join(f"{m} p50 ms" for m in result["modes"]) + " | exit agreement |",
            "|---|" + "---:|" * (len(result["modes"]) + 1),
        ]
        for kind, by_mode in result["by_kind"].items():
            cells = [_fmt(by_mode.get(m, {}).get("p50_ms")) for m in result["modes"]]
            agree = _fmt(by_mode.get("exit", {}).get("agreement_with_full"))
            lines.append(f"| {kind} | " + " | ".join(cells) + f" | {agree} |")
    commit = p["commit"] or "not a git checkout"
    lines += [
        "",
        f"edge-spade {p['edge_spade']} ({commit}), llama-cpp-python {p['llama_cpp_python']}, "
        f"model sha256 {p['models'][0]['model_sha256'][:12]}, {p['date']}. Command: `{p['command']}`",
    ]
    return "\n".join(lines) + "\n"


def plot(result: dict, png: Path) -> bool:
    """Latency CDF per mode beside energy per answer per mode; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib not installed: no PNG (pip install 'edge-spade[bench]')")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in result["modes"]:
        ms = np.sort([r["ms"] for r in result["records"] if r["mode"] == mode])
        if len(ms):
            left.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=mode)
    left.set_xscale("log")
    left.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xlabel("latency per answer (ms, log scale)")
    left.set_ylabel("share of answers")
    left.set_title("latency CDF")
    left.grid(alpha=0.3)
    left.legend()
    modes = list(result["modes"])
    joules = [result["modes"][m].get("energy_j_per_answer") for m in modes]
    if any(j is not None for j in joules):
        right.bar(modes, [j or 0 for j in joules], color=["C0", "C1", "C2", "C3"][: len(modes)])
        right.set_ylabel("joules per answer")
        right.set_title(f"energy per answer ({result['energy']['source']})")
    else:
        right.set_axis_off()
        reason = result["energy"]["unavailable"] or "no reading"
        right.text(0.5, 0.5, "energy not measured:\n" + _wrap(reason), ha="center", va="center", fontsize=9)
    p = result["provenance"]
    fig.suptitle(f"edge-spade bench: {p['models'][0]['model']}, {p['models'][0]['threads']} threads, {p['cpu']}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _wrap(text: str, width: int = 60) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def write(result: dict, folder: Path) -> list[Path]:
    """bench-<model>.json, .md and .png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", result["provenance"]["models"][0]["model"])
    stem = folder / f"bench-{name}"
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(result, indent=1) + "\n")
    paths[1].write_text(markdown(result))
    if plot(result, stem.with_suffix(".png")):
        paths.append(stem.with_suffix(".png"))
    return paths
