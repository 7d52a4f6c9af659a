"""Peak memory (RSS) of each way of answering, against llama-cpp-python answering the same, one process each.

    python -m benchmarks.memory --model gemma3-270m --out benchmarks/results/memory-gemma3-270m.json

Each mode runs in a fresh process (the peak is the kernel's ru_maxrss of that process): a
one-question `edge-spade ask` free and with choices, at full depth and by default; a batch
(`ask --file`, 20 free questions; and 20 of the bench's 8-shot free questions, which the default
rule checks (with SPADE probes: on a tail model, the head model loaded), with the count that
exited); the Python API in one process
asking every mode in turn, with its memory after `close()`; and llama-cpp-python's `Llama`
evaluating the same prompt and taking the argmax (what a user would run instead).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import save_json

FREE = "The capital city of Chile is"
LLAMA_CPP = """
import sys
import numpy as np
from llama_cpp import Llama
from edge_spade.engine import llama_cpp_python_buffers
with llama_cpp_python_buffers():
    llm = Llama(sys.argv[1], n_ctx=2048, verbose=False)
llm.eval(llm.tokenize(sys.argv[2].encode(), add_bos=True, special=False))
print(int(np.argmax(llm.scores[llm.n_tokens - 1])))
"""
API = """
import sys, resource
from edge_spade import load_model
rt = load_model(sys.argv[1])
rt.ask(sys.argv[2], full=True); rt.ask(sys.argv[2]); rt.ask("Is water wet?", ["yes", "no"])
rt.ask(sys.argv[2], layer=4); rt.ask("Is water wet?", ["yes", "no"], layer=4, lens="logit")
rt.ask(sys.argv[2], layer=4, lens="logit")
rt.close()
import gc; gc.collect()
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""


def peak_kb(argv: list[str], env: dict | None = None) -> tuple[int, str]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:6]} failed")
    return usage.ru_maxrss, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    py, cli = sys.executable, [sys.executable, "-m", "edge_spade.cli", "-q", "ask"]
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch.jsonl"
        facts = ["The capital of Peru is", "One child, two", "The opposite of hot is", "Monday, Tuesday,"]
        batch.write_text("".join(json.dumps({"question": f"{q} {q} {q} {q} {q}"}) + "\n" for q in facts * 5))
        from edge_spade.bench.sets import load_set
        from edge_spade.registry import resolve_model

        shots = Path(tmp) / "free-8.jsonl"
        shots.write_text("".join(json.dumps({"question": q.question}) + "\n" for q in load_set("free-8")[:20]))

        modes = {
            "llama-cpp-python": [py, "-c", LLAMA_CPP, str(resolve_model(args.model).path), FREE],
            "ask free, --full": [*cli, FREE, "--model", args.model, "--full"],
            "ask free, default": [*cli, FREE, "--model", args.model],
            "ask choices, default": [*cli, "Is water wet?", "--choices", "yes", "no", "--model", args.model],
            "ask --file (20 free, probes)": [*cli, "--file", str(batch), "--model", args.model, "--no-guard"],
            "ask --file (20 free 8-shot, checked)": [
                *[*cli, "--file", str(shots), "--json", "--model", args.model, "--no-guard"],
            ],
            "API, every mode incl. logit lens": [py, "-c", API, args.model, FREE],
        }
        rows = []
        for name, command in modes.items():
            kb, out = peak_kb(command)
            row = {"mode": name, "peak_rss_mb": round(kb / 1024, 1)}
            if name.startswith("API"):
                row["rss_after_close_mb"] = round(int(out.strip().splitlines()[-1]) / 1024, 1)
            if "--json" in command:
                row["exits"] = sum(json.loads(line).get("exit_layer") is not None for line in out.splitlines())
            rows.append(row)
    base = rows[0]["peak_rss_mb"]
    for row in rows:
        row["vs_llama_cpp"] = round(row["peak_rss_mb"] / base, 2)
        after = f", {row['rss_after_close_mb']:.0f} MB after close()" if "rss_after_close_mb" in row else ""
        after += f", {row['exits']} exits" if "exits" in row else ""
        print(f"{row['mode']:<36}{row['peak_rss_mb']:>8.0f} MB  x{row['vs_llama_cpp']:.2f}{after}")
    if args.out:
        save_json({"model": args.model, "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
