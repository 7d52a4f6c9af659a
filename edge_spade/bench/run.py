"""The benchmark itself: every mode answers the same questions, interleaved question by question
after a warm-up, with time, CPU time and (where a sensor allows) energy read around each answer.

Modes: `full` (our full-depth answer), `exit` (the default SPADE-EXIT answer, as `ask` gives it)
and `llama-cpp` (llama-cpp-python's `Llama` evaluating the same prompt tokens and taking the
best decision token: the fastest answer its high-level class gives, the yardstick a user would
pick instead). A battery is read between blocks of one mode instead (its reading is coarse).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import EdgeSpadeError
from .energy import OnMainsPower, Sensor, SensorUnavailable, open_sensor
from .provenance import model_record, provenance
from .sets import Question, SetError, load_set

log = logging.getLogger(__name__)

MODES = ("full", "exit", "llama-cpp")
SCHEMA = "edge-spade-bench/1"
BATTERY_ROUNDS = 3  # blocks per mode on battery, alternating modes, so a drift in draw hits each alike
RSS_QUESTIONS = 8  # questions each peak-RSS child process answers


class BenchError(EdgeSpadeError):
    """A benchmark that cannot run as asked; the message says why."""


@dataclass
class BenchSettings:
    model: str | None = None
    heads: str | None = None
    set: str = "mixed"
    n: int | None = None  # questions (each answered in every mode); default 100 unless `duration`
    duration: float | None = None  # seconds of measured answers instead of a count
    threads: int | None = None
    energy: str = "auto"
    allow_ac: bool = False
    modes: tuple[str, ...] = MODES
    warmup: int = 4
    rss: bool = True
    n_ctx: int = 2048
    sysfs: str = "/sys"  # where sysfs is mounted (a container may mount the host's elsewhere)
    progress: bool = True
    command: str = "edge-spade bench"

    def check(self) -> None:
        if self.n is not None and self.duration is not None:
            raise BenchError("give --n or --duration, not both")
        if self.n is not None and self.n < 1:
            raise BenchError(f"--n must be at least 1, got {self.n}")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            raise BenchError(f"--duration must be a positive number of seconds, got {self.duration}")
        if self.warmup < 0:
            raise BenchError(f"--warmup must be 0 or more, got {self.warmup}")
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes or len(set(self.modes)) != len(self.modes):
            raise BenchError(f"modes must be distinct ones of {', '.join(MODES)}, got {' '.join(self.modes)}")
        if "full" not in self.modes:
            raise BenchError("the modes must include full: agreement is measured against it")


@dataclass
class Record:
    """One measured answer."""

    question: int  # index into the question set
    mode: str
    ms: float
    cpu_s: float
    decision: int  # the choice index, or the free answer's token id
    joules: float | None = None
    layer: int | None = None  # exit mode: the layer that answered (None: full depth)


@dataclass
class Block:
    """A stretch of one mode's answers on battery, with the battery read at both ends."""

    mode: str
    answers: int
    seconds: float
    joules: float
    percent: float


def last_logits(llm) -> np.ndarray:
    """The last prompt row's logits after `Llama.eval`, as its sampler reads them (without
    logits_all, llama-cpp-python 0.3 no longer copies them into `Llama.scores`)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


class LlamaCpp:
    """llama-cpp-python's high-level `Llama` on the same file, threads and prompt tokens."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        from llama_cpp import Llama

        from ..engine import llama_cpp_python_buffers

        with llama_cpp_python_buffers():  # the engine's buffer choice (no AMX crash)
            self.llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                n_gpu_layers=0,
                verbose=False,
            )

    def answer(self, tokens: list[int], ids: np.ndarray | None, decide: Callable[[np.ndarray], int]) -> int:
        self.llm.reset()
        self.llm.eval(tokens)
        logits = last_logits(self.llm)
        return decide(logits if ids is None else logits[ids])

    def close(self) -> None:
        self.llm.close()


@dataclass
class Bench:
    """A loaded benchmark: questions, the runtime, the yardstick, the sensor."""

    settings: BenchSettings
    questions: list[Question]
    rt: object
    llama: LlamaCpp | None
    sensor: Sensor | None
    energy_unavailable: str | None
    records: list[Record] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
    interrupted: bool = False

    def answer(self, mode: str, index: int) -> Record:
        q = self.questions[index % len(self.questions)]
        prompt = self.rt.prompt(q.question, q.choices) if mode == "llama-cpp" else None
        per_answer = self.sensor is not None and self.sensor.per_answer
        e0 = self.read_energy() if per_answer else None
        c0, t0 = time.process_time(), time.perf_counter()
        layer = None
        if mode == "llama-cpp":
            decision = self.llama.answer(prompt.tokens, prompt.ids, prompt.decide)
        else:
            a = self.rt.ask(q.question, q.choices, full=mode == "full")
            decision = a.token if a.choice_index is None else a.choice_index
            layer = a.exit_layer if mode == "exit" else None
        ms = (time.perf_counter() - t0) * 1000
        cpu = time.process_time() - c0
        e1 = self.read_energy() if per_answer else None
        joules = e1 - e0 if e0 is not None and e1 is not None else None
        return Record(index % len(self.questions), mode, ms, cpu, decision, joules, layer)

    def read_energy(self) -> float | None:
        """The sensor's count, or None from the first failed read on (the run goes on without energy)."""
        if self.sensor is None:
            return None
        try:
            return self.sensor.joules()
        except (OSError, ValueError, SensorUnavailable) as exc:
            log.warning("energy sensor failed, measuring on without it: %s", exc)
            self.energy_unavailable = f"the {self.sensor.source} sensor failed during the run: {exc}"
            self.sensor = None
            self.records = [replace(r, joules=None) for r in self.records]
            return None

    def read_battery(self) -> tuple[float, float] | None:
        """(joules given up, percent left), or None once the battery cannot be read (energy dropped)."""
        try:
            return self.sensor.joules(), self.sensor.percent()
        except (OSError, ValueError, SensorUnavailable) as exc:
            log.warning("battery reading failed, stopping: %s", exc)
            self.energy_unavailable = f"the battery sensor failed during the run: {exc}"
            self.sensor, self.blocks = None, []
            return None


def load_bench(settings: BenchSettings) -> Bench:
    """Questions, sensor, model and yardstick, each refused with a clear error before any work."""
    from edge_spade.runtime import load_model

    settings.check()
    try:
        questions = load_set(settings.set)
    except SetError as exc:
        raise BenchError(str(exc)) from None
    if settings.energy == "battery" and settings.duration is None:
        raise BenchError("battery energy needs --duration (the battery's reading moves every few seconds): e.g. 600")
    try:
        sensor, unavailable = open_sensor(
            settings.energy,
            allow_mains=settings.allow_ac,
            powercap=Path(settings.sysfs, "class", "powercap", "intel-rapl"),
            power_supply=Path(settings.sysfs, "class", "power_supply"),
        )
    except (SensorUnavailable, OnMainsPower) as exc:
        raise BenchError(f"{settings.energy} energy: {exc}") from None
    if sensor is not None and sensor.source == "battery" and sensor.on_mains:
        sensor, unavailable = None, "on mains power (--allow-ac): the battery's discharge does not measure this run"
    if sensor is not None and not sensor.per_answer and settings.duration is None:
        log.warning("%s; no energy per answer without --duration", sensor.detail)
        sensor, unavailable = None, "a battery needs --duration: its reading moves every few seconds"
    rt = load_model(settings.model, threads=settings.threads, heads=settings.heads, n_ctx=settings.n_ctx)
    llama = None
    try:
        if "llama-cpp" in settings.modes:
            llama = LlamaCpp(rt.engine.path, rt.engine.threads, settings.n_ctx)
    except Exception:
        rt.close()
        raise
    return Bench(settings, questions, rt, llama, sensor, unavailable)


def run_bench(settings: BenchSettings) -> dict:
    """Load, measure, summarise: the result as a JSON-ready dict (see report.py for its forms)."""
    peak = peak_rss(settings) if settings.rss else {}
    bench = load_bench(settings)
    try:
        _warm_up(bench)
        amount = f"{settings.duration:g} s" if settings.duration else f"{settings.n or 100} questions"
        log.info("measuring %s in %s (Ctrl-C stops and keeps what was measured)", amount, ", ".join(settings.modes))
        if bench.sensor is not None and not bench.sensor.per_answer:
            _run_blocks(bench)
        else:
            _run_interleaved(bench)
        return summarise(bench, peak)
    finally:
        bench.rt.close()
        if bench.llama is not None:
            bench.llama.close()
        if bench.sensor is not None:
            bench.sensor.close()


def _warm_up(bench: Bench) -> None:
    for i in range(min(bench.settings.warmup, len(bench.questions))):
        for mode in bench.settings.modes:
            bench.answer(mode, i)


def _progress(settings: BenchSettings, total: float, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="bench", disable=not settings.progress, file=sys.stderr, leave=False)


def _run_interleaved(bench: Bench) -> None:
    """Each question in every mode, in an order rotated per question (no mode always goes first)."""
    s = bench.settings
    modes = list(s.modes)
    count = (s.n or 100) if s.duration is None else None
    start = time.perf_counter()
    bar = _progress(s, count if count else s.duration, "q" if count else "s")
    i = 0
    try:
        while (i < count) if count else (time.perf_counter() - start < s.duration):
            k = i % len(modes)
            for mode in modes[k:] + modes[:k]:
                bench.records.append(bench.answer(mode, i))
            i += 1
            bar.update(1 if count else min(time.perf_counter() - start, s.duration) - bar.n)
    except KeyboardInterrupt:
        bench.interrupted = True
        log.warning("interrupted: summarising the %d questions answered", i)
    finally:
        bar.close()
    _drop_partial(bench)


def _run_blocks(bench: Bench) -> None:
    """On battery: modes take turns in blocks, the battery read at each block's ends."""
    s = bench.settings
    block_s = s.duration / (BATTERY_ROUNDS * len(s.modes))
    if block_s < 60:
        log.warning("battery blocks of %.0f s: readings update every few seconds, so figures are coarse", block_s)
    next_index = dict.fromkeys(s.modes, 0)
    bar = _progress(s, s.duration, "s")
    try:
        for _ in range(BATTERY_ROUNDS):
            for mode in s.modes:
                start = bench.read_battery()
                t0 = time.perf_counter()
                answers = 0
                while time.perf_counter() - t0 < block_s:
                    bench.records.append(bench.answer(mode, next_index[mode]))
                    next_index[mode] += 1
                    answers += 1
                elapsed = time.perf_counter() - t0
                end = bench.read_battery()
                if start is None or end is None:
                    return  # the sensor failed: the answers so far stand, without energy
                bench.blocks.append(Block(mode, answers, elapsed, end[0] - start[0], start[1] - end[1]))
                bar.update(elapsed)
    except KeyboardInterrupt:
        bench.interrupted = True
        log.warning("interrupted: summarising the complete blocks")
    finally:
        bar.close()


def _drop_partial(bench: Bench) -> None:
    """A question interrupted part-way is dropped from every mode, so all modes answer the same
    questions (each question appends one record per mode, in turn)."""
    n_modes = len(bench.settings.modes)
    del bench.records[len(bench.records) // n_modes * n_modes :]


def summarise(bench: Bench, peak: dict[str, dict]) -> dict:
    s = bench.settings
    questions = bench.questions
    by_mode = {m: [r for r in bench.records if r.mode == m] for m in s.modes}
    full_at = {r.question: r.decision for r in by_mode["full"]}
    modes = {}
    for mode, records in by_mode.items():
        modes[mode] = _mode_summary(bench, mode, records, full_at) | peak.get(mode, {"peak_rss_mb": None})
    kinds = sorted({q.kind for q in questions})
    by_kind = {}
    for kind in kinds:
        rows = {}
        for mode, records in by_mode.items():
            mine = [r for r in records if questions[r.question].kind == kind]
            if mine:
                rows[mode] = _latency(mine) | {"agreement_with_full": _agreement(mine, full_at)[0]}
        if rows:
            by_kind[kind] = rows
    energy = {
        "source": bench.sensor.source if bench.sensor else None,
        "detail": bench.sensor.detail if bench.sensor else None,
        "unavailable": bench.energy_unavailable,
        "schedule": "blocks" if bench.blocks else "per answer",
    }
    return {
        "schema": SCHEMA,
        "provenance": provenance([model_record(bench.rt)], s.command),
        "settings": {k: v for k, v in asdict(s).items() if k not in ("progress", "command")},
        "questions": {"set": s.set, "distinct": len(questions), "answered": len(by_mode["full"])},
        "energy": energy,
        "modes": modes,
        "speedups": _speedups(modes),
        "by_kind": by_kind,
        "blocks": [asdict(b) for b in bench.blocks],
        "interrupted": bench.interrupted,
        "records": [
            {"id": questions[r.question].id, **{k: v for k, v in asdict(r).items() if k != "question"}}
            for r in bench.records
        ],
    }


def _latency(records: list[Record]) -> dict:
    ms = np.array([r.ms for r in records])
    if not len(ms):
        return {"answers": 0}
    return {
        "answers": len(ms),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "mean_ms": round(float(ms.mean()), 2),
        "total_s": round(float(ms.sum()) / 1000, 3),
    }


def _agreement(records: list[Record], full_at: dict[int, int]) -> tuple[float | None, float | None]:
    """Agreement with the full-depth answer to the same question, and Cohen's kappa."""
    pairs = [(r.decision, full_at[r.question]) for r in records if r.question in full_at]
    if not pairs:
        return None, None
    ours, full = zip(*pairs)
    observed = sum(a == b for a, b in pairs) / len(pairs)
    labels = set(ours) | set(full)
    chance = sum((ours.count(x) / len(pairs)) * (full.count(x) / len(pairs)) for x in labels)
    kappa = 1.0 if chance == 1 else (observed - chance) / (1 - chance)
    return round(observed, 4), round(kappa, 4)


def _mode_summary(bench: Bench, mode: str, records: list[Record], full_at: dict[int, int]) -> dict:
    out = _latency(records)
    if not records:
        return out
    agreement, kappa = _agreement(records, full_at)
    out |= {
        "answers_per_s": round(len(records) / max(out["total_s"], 1e-9), 2),
        "cpu_s_per_answer": round(sum(r.cpu_s for r in records) / len(records), 4),
        "agreement_with_full": agreement,
        "kappa_with_full": kappa,
        "energy_j_per_answer": None,
    }
    if mode == "exit":
        out["exit_share"] = round(sum(r.layer is not None for r in records) / len(records), 4)
    if bench.blocks:
        mine = [b for b in bench.blocks if b.mode == mode]
        answers = sum(b.answers for b in mine)
        joules, percent = sum(b.joules for b in mine), sum(b.percent for b in mine)
        if answers and joules > 0:
            out["energy_j_per_answer"] = round(joules / answers, 4)
            out["battery_pct_per_1000"] = round(1000 * percent / answers, 3)
        else:
            out["energy_note"] = "the battery's reading did not fall during this mode's blocks: run longer"
    elif records[0].joules is not None:
        out["energy_j_per_answer"] = round(sum(r.joules for r in records) / len(records), 4)
    return out


def _speedups(modes: dict) -> dict:
    """How many times faster one mode is than another, by median and by total time."""
    out = {}
    for fast, slow in (("exit", "full"), ("exit", "llama-cpp"), ("full", "llama-cpp")):
        a, b = modes.get(fast, {}), modes.get(slow, {})
        if a.get("answers") and b.get("answers"):
            out[f"{fast}_vs_{slow}"] = {
                "median": round(b["p50_ms"] / a["p50_ms"], 3),
                "total": round((b["total_s"] / b["answers"]) / (a["total_s"] / a["answers"]), 3),
            }
    return out


def peak_rss(settings: BenchSettings) -> dict[str, dict]:
    """Peak resident memory of each mode on its own: a child process loads what that mode needs
    and answers a few questions (in one process the modes' memory would be counted together)."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="edge-spade-bench-") as tmp:
        spec = Path(tmp) / "settings.json"
        spec.write_text(json.dumps(asdict(settings)))
        for mode in settings.modes:
            cmd = [sys.executable, "-m", "edge_spade.bench.peak", str(spec), mode]
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONWARNINGS": "ignore"}
                )
            except subprocess.TimeoutExpired:
                out[mode] = {"peak_rss_mb": None, "peak_rss_note": "the measuring process timed out"}
                continue
            lines = done.stdout.strip().splitlines()
            if done.returncode == 0 and lines:
                out[mode] = json.loads(lines[-1])
            else:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                out[mode] = {"peak_rss_mb": None, "peak_rss_note": f"the measuring process failed: {reason}"}
    return out
