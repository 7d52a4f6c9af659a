"""The resident server: one question through it against a one-question process, and a load test.

    python -m benchmarks.server --model gemma3-270m --requests 2000 --out benchmarks/results/server-gemma3-270m.json

1. Paired, alternating: `edge-spade ask ... --server URL` against `edge-spade ask ...` (a process
   that loads the model), wall time of the whole command.
2. Load, for `--parallel 1` and `2`: 8 client threads on loopback send `--requests` questions in
   all (choice and free, mixed); every answer is compared with the same question answered
   sequentially in-process; p50/p95 latency, throughput, errors, and the server's RSS sampled
   throughout. The server runs with `--no-guard`, so that which layer answers does not depend on
   what came before and answers can be compared exactly.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import pyplot, save_json

QUESTIONS = [
    ("Is the sky blue?", ["yes", "no"]),
    ("The capital city of Chile is", None),
    ("Which gas do plants absorb from the air?", ["oxygen", "carbon dioxide", "helium"]),
    ("One mouse, two", None),
    ("Is fire cold?", ["yes", "no"]),
    ("Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. Monday, Tuesday,", None),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str, parallel: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edge_spade.cli",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--parallel",
            str(parallel),
            "--queue",
            "64",
            "--no-guard",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):  # up to a minute: the server listens at once and loads the model behind it
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as r:
                if json.loads(r.read())["status"] == "ready":
                    return proc, url
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def post(url: str, question: str, choices) -> tuple[float, dict]:
    body = json.dumps({"question": question, "choices": choices}).encode()
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/ask", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return (time.perf_counter() - t0) * 1000, json.loads(r.read())


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_test(model: str, parallel: int, n: int, reference: dict) -> dict:
    proc, url = start(model, parallel)
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mb(proc.pid))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    errors, mismatches, latencies = 0, 0, []
    t0 = time.perf_counter()

    def one(i: int):
        q, c = QUESTIONS[i % len(QUESTIONS)]
        try:
            ms, a = post(url, q, c)
        except OSError:
            return None
        return i, ms, a

    with ThreadPoolExecutor(8) as pool:
        for result in pool.map(one, range(n)):
            if result is None:
                errors += 1
                continue
            i, ms, a = result
            latencies.append(ms)
            ref = reference[QUESTIONS[i % len(QUESTIONS)][0]]
            mismatches += (a["answer"], a["probs"], a["layer"]) != (ref["answer"], ref["probs"], ref["layer"])
    wall = time.perf_counter() - t0
    stop.set()
    proc.terminate()  # SIGTERM: a clean shutdown
    code = proc.wait(timeout=60)
    latencies.sort()
    return {
        "parallel": parallel,
        "requests": n,
        "errors": errors,
        "mismatches": mismatches,
        "latencies_ms": [round(x, 2) for x in latencies],
        "rss_samples_mb": [round(x, 1) for x in samples],
        "p50_ms": round(latencies[len(latencies) // 2], 1),
        "p95_ms": round(latencies[int(len(latencies) * 0.95)], 1),
        "answers_per_s": round(len(latencies) / wall, 1),
        "rss_mb_min": round(min(samples), 1),
        "rss_mb_max": round(max(samples), 1),
        "rss_mb_last": round(samples[-1], 1),
        "exit_code_on_sigterm": code,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    from edge_spade import load_model

    with load_model(args.model, speed_guard=False) as rt:  # the sequential in-process answers
        reference = {q: rt.ask(q, c).to_dict() for q, c in QUESTIONS}
    proc, url = start(args.model, 1)
    cli = [sys.executable, "-m", "edge_spade.cli", "-q", "ask", "Is the sky blue?", "--choices", "yes", "no"]
    walls = {"server": [], "process": []}
    for i in range(args.pairs):
        for mode in ("server", "process") if i % 2 == 0 else ("process", "server"):
            t0 = time.perf_counter()
            subprocess.run(
                cli + (["--server", url] if mode == "server" else ["--model", args.model]),
                check=True,
                capture_output=True,
                env={**os.environ, "EDGE_SPADE_SERVER": ""},
            )
            walls[mode].append((time.perf_counter() - t0) * 1000)
    proc.terminate()
    proc.wait(timeout=60)
    one = {m: round(statistics.median(v), 1) for m, v in walls.items()}
    one["speedup"] = round(one["process"] / one["server"], 2)
    print(
        f"one question: {one['server']:.0f} ms through the server, {one['process']:.0f} ms as a process "
        f"({one['speedup']:.1f}x)"
    )
    loads = []
    for parallel in (1, 2):
        r = load_test(args.model, parallel, args.requests, reference)
        loads.append(r)
        print(
            f"--parallel {parallel}: {r['requests']} requests, {r['errors']} errors, {r['mismatches']} answers "
            f"differing, p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, {r['answers_per_s']} answers/s, RSS "
            f"{r['rss_mb_min']:.0f}-{r['rss_mb_max']:.0f} MB, exit {r['exit_code_on_sigterm']} on SIGTERM"
        )
    if args.out:
        out = save_json({"model": args.model, "one_question_ms": one, "load": loads}, args.out)
        plot(loads, out.with_suffix(".png"))
    return 0


def plot(loads: list[dict], png: Path) -> None:
    """Latency CDF per --parallel, and the server's RSS over the run (flat: nothing leaks)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (cdf, rss) = plt.subplots(1, 2, figsize=(10, 4))
    for r in loads:
        xs = sorted(r["latencies_ms"])
        cdf.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=f"--parallel {r['parallel']}")
        rss.plot(
            [0.5 * i for i in range(len(r["rss_samples_mb"]))], r["rss_samples_mb"], label=f"--parallel {r['parallel']}"
        )
    cdf.set_xlabel("latency per request, ms (8 clients)")
    cdf.set_ylabel("share of requests")
    rss.set_xlabel("seconds into the load")
    rss.set_ylabel("server RSS, MB")
    for ax in (cdf, rss):
        ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
