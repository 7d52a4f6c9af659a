"""`edge-spade calibrate`: L-SPADE heads and an exit threshold for one model, from unlabeled prompts.

1. Collect: one trace pass per prompt keeps the answer row after every layer; SPADE at every
   candidate layer gives its decision-set logits. Each prompt's arrays are cached on disk
   (keyed by model fingerprint and prompt), so an interrupted run resumes where it stopped.
2. Train per layer, in numpy: L-SPADE (target: SPADE's distribution at that layer) and the
   tuned lens (target: the full model's), both over the decision set of each prompt.
3. Pick the threshold on a held-out split: the largest whose agreement with the full model
   is at least the target with the requested confidence (Clopper-Pearson lower bound).
4. Export: `lspade.onnx` (+ `tuned.onnx`) and `heads.json`, the manifest tying them to the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .datasets import Item
from .heads import LayerHead, entropy, export_onnx, head_logits, masked_log_softmax, train_head
from .manifest import HEADS_FORMAT, HeadsManifest, output_fingerprint
from .runtime import Runtime
from .weights import cache_dir

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One calibration prompt, reduced to what training and threshold picking need."""

    ids: np.ndarray  # (m,) decision-set token ids
    groups: tuple[tuple[int, ...], ...]  # positions in ids per choice
    hidden: np.ndarray  # (n_layers, d) answer row after every layer
    spade: np.ndarray  # (n_layers, m) SPADE's decision logits at every layer (last = full)
    full: np.ndarray  # (m,) the full model's decision logits

    def choice(self, logits: np.ndarray) -> int:
        return int(np.argmax([np.logaddexp.reduce(logits[list(g)]) for g in self.groups]))


def collect(rt: Runtime, items: Iterable[Item], tail: int = 1, progress=None) -> list[Sample]:
    """Trace + SPADE at every layer for each choice question (cached per prompt)."""
    engine = rt.engine
    fingerprint = output_fingerprint(engine)
    folder = cache_dir() / "calibration" / fingerprint[:16] / f"tail{tail}"
    folder.mkdir(parents=True, exist_ok=True)
    samples = []
    items = [i for i in items if i.choices]
    for item in progress(items) if progress else items:
        prompt = rt.prompt(item.question, item.choices)
        key = hashlib.sha256(json.dumps([prompt.tokens, prompt.ids.tolist()]).encode()).hexdigest()[:24]
        path = folder / f"{key}.npz"
        if path.exists():
            data = np.load(path)
            hidden, spade = data["hidden"], data["spade"]
        else:
            trace = engine.trace(prompt.tokens, prompt.ids, tail=tail)
            tokens = [prompt.tokens[r] for r in trace.tail_rows]
            spade = np.stack([engine.spade_tail(trace.states[layer], layer, prompt.ids, tokens)
                              for layer in range(engine.n_layers - 1)] + [trace.full.logits])
            hidden = trace.last
            tmp = folder / f"{key}.tmp{os.getpid()}.npz"
            np.savez(tmp, hidden=hidden, spade=spade)
            tmp.replace(path)
        samples.append(Sample(prompt.ids, prompt.groups, hidden.astype(np.float32), spade.astype(np.float32),
                              spade[-1].astype(np.float32)))
    return samples


def _stack(samples: list[Sample], layer: int, target: str):
    """Shared id list, mask and target logits for one layer."""
    vocab = sorted({int(i) for s in samples for i in s.ids})
    col = {tok: j for j, tok in enumerate(vocab)}
    mask = np.zeros((len(samples), len(vocab)), bool)
    logits = np.zeros((len(samples), len(vocab)), np.float32)
    for n, s in enumerate(samples):
        cols = [col[int(i)] for i in s.ids]
        mask[n, cols] = True
        logits[n, cols] = s.spade[layer] if target == "spade" else s.full
    hidden = np.stack([s.hidden[layer] for s in samples])
    return np.array(vocab), mask, logits, hidden


def train_heads(rt: Runtime, samples: list[Sample], layers: list[int], target: str, rank: int, steps: int,
                lr: float) -> list[LayerHead]:
    engine = rt.engine
    heads = []
    for layer in layers:
        vocab, mask, logits, hidden = _stack(samples, layer, target)
        head, losses = train_head(hidden, logits, mask, engine.head.rows(vocab), engine.head.norm_weight,
                                  engine.index.rms_eps, rank=rank, steps=steps, lr=lr, seed=layer)
        log.info("%s head, layer %d: cross-entropy %.4f -> %.4f", target, layer, losses[0], losses[-1])
        heads.append(head)
    return heads


def head_entropies(rt: Runtime, heads: list[LayerHead], layers: list[int], samples: list[Sample]) -> np.ndarray:
    """(n_samples, n_layers_evaluated) choice-level entropy of each head (numpy, as the runtime does)."""
    engine = rt.engine
    out = np.zeros((len(samples), len(layers)))
    for n, s in enumerate(samples):
        rows = engine.head.rows(s.ids)
        for j, (layer, head) in enumerate(zip(layers, heads)):
            logits = head_logits(head, s.hidden[layer][None], rows, engine.head.norm_weight, engine.index.rms_eps)[0]
            out[n, j] = entropy(np.array([np.logaddexp.reduce(logits[list(g)]) for g in s.groups]))
    return out


def clopper_pearson_lower(successes: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on a binomial proportion (exact, by bisection)."""
    if n == 0 or successes == 0:
        return 0.0
    alpha = 1.0 - confidence
    if successes == n:
        return alpha ** (1.0 / n)

    def upper_tail(p: float) -> float:  # P(X >= successes | n, p)
        logs = [math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * math.log(p)
                + (n - k) * math.log1p(-p) for k in range(successes, n + 1)]
        m = max(logs)
        return math.exp(m) * sum(math.exp(x - m) for x in logs)

    lo, hi = 0.0, successes / n
    for _ in range(100):
        mid = (lo + hi) / 2
        if upper_tail(mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class CurvePoint:
    threshold: float
    agreement: float
    lower_bound: float
    mean_exit_layer: float
    exit_rate: float


def exit_curve(samples: list[Sample], entropies: np.ndarray, layers: list[int], n_layers: int,
               confidence: float, answers_from: str = "spade", heads_logits=None) -> list[CurvePoint]:
    """Agreement with the full answer and mean exit layer for every useful threshold."""
    full = np.array([s.choice(s.full) for s in samples])
    if answers_from == "spade":
        at = np.array([[s.choice(s.spade[layer]) for layer in layers] for s in samples])
    else:  # the lens's own answers (baselines)
        at = heads_logits
    candidates = np.unique(np.concatenate([[0.0], entropies.ravel(), [np.inf]]))
    if len(candidates) > 400:
        candidates = np.unique(np.quantile(candidates[np.isfinite(candidates)], np.linspace(0, 1, 400)))
        candidates = np.concatenate([candidates, [np.inf]])
    curve = []
    for tau in candidates:
        exits = entropies <= tau
        first = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
        answer = np.where(first >= 0, at[np.arange(len(samples)), np.maximum(first, 0)], full)
        layer = np.where(first >= 0, np.array(layers)[np.maximum(first, 0)], n_layers - 1)
        agree = int((answer == full).sum())
        curve.append(CurvePoint(float(tau), agree / len(samples), clopper_pearson_lower(agree, len(samples), confidence),
                                float(layer.mean()), float((first >= 0).mean())))
    return curve


def pick_threshold(curve: list[CurvePoint], target: float) -> float:
    """The largest threshold whose lower bound reaches the target (-1: never exit)."""
    ok = [p.threshold for p in curve if p.lower_bound >= target and math.isfinite(p.threshold)]
    return max(ok) if ok else -1.0


@dataclass
class CalibrationResult:
    manifest: HeadsManifest
    out_dir: Path
    holdout: dict = field(default_factory=dict)


def calibrate(
    rt: Runtime,
    items: list[Item],
    out_dir: str | Path,
    *,
    data_names: list[str],
    layers: list[int] | None = None,
    min_layer: int = 1,
    holdout: float = 0.3,
    target_agreement: float = 0.99,
    confidence: float = 0.95,
    rank: int = 64,
    steps: int = 300,
    lr: float = 5e-3,
    tail: int = 1,
    seed: int = 0,
    progress=None,
) -> CalibrationResult:
    """Collect, train, pick the threshold, export; writes into `out_dir` atomically."""
    engine = rt.engine
    L = engine.n_layers
    layers = layers or list(range(min_layer, L - 1))
    t0 = time.perf_counter()
    samples = collect(rt, items, tail=tail, progress=progress)
    if len(samples) < 10:
        raise ValueError(f"calibration needs at least 10 choice questions, got {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))
    n_hold = max(5, int(len(samples) * holdout))
    held = [samples[i] for i in order[:n_hold]]
    train = [samples[i] for i in order[n_hold:]]
    log.info("collected %d prompts in %.0f s; training on %d, holding out %d", len(samples),
             time.perf_counter() - t0, len(train), len(held))

    lspade = train_heads(rt, train, layers, "spade", rank, steps, lr)
    tuned = train_heads(rt, train, layers, "full", rank, steps, lr)
    curves, thresholds, layer_stats = {}, {}, []
    ent = {"lspade": head_entropies(rt, lspade, layers, held), "tuned": head_entropies(rt, tuned, layers, held)}
    identity = [LayerHead.identity(engine.n_embd, 1) for _ in layers]
    ent["logit_lens"] = head_entropies(rt, identity, layers, held)
    own = {}
    for name, heads in (("tuned", tuned), ("logit_lens", identity)):
        own[name] = np.array([[s.choice(head_logits(h, s.hidden[layer][None], engine.head.rows(s.ids),
                                                    engine.head.norm_weight, engine.index.rms_eps)[0])
                               for layer, h in zip(layers, heads)] for s in held])
    for name in ent:
        source = "spade" if name == "lspade" else "own"
        curves[name] = exit_curve(held, ent[name], layers, L, confidence, source, own.get(name))
        thresholds[name] = pick_threshold(curves[name], target_agreement)
    full = np.array([s.choice(s.full) for s in held])
    for j, layer in enumerate(layers):
        spade_ans = np.array([s.choice(s.spade[layer]) for s in held])
        head_ans = np.array([s.choice(head_logits(lspade[j], s.hidden[layer][None], engine.head.rows(s.ids),
                                                  engine.head.norm_weight, engine.index.rms_eps)[0]) for s in held])
        layer_stats.append({"layer": layer, "spade_agree_full": float((spade_ans == full).mean()),
                            "lspade_agree_spade": float((head_ans == spade_ans).mean()),
                            "lspade_ce": float(_ce(lspade[j], held, layer, rt))})
    manifest = HeadsManifest(
        format=HEADS_FORMAT,
        model=rt.name,
        model_file=engine.path.name,
        output_fingerprint=output_fingerprint(engine),
        arch=engine.arch.name,
        n_layers=L,
        n_embd=engine.n_embd,
        layers=layers,
        eval_layers=layers,
        threshold=thresholds["lspade"],
        thresholds=thresholds,
        tail=tail,
        rank=rank,
        onnx_opset=17,
        dtype="float16",
        calibration={
            "data": data_names, "n_prompts": len(samples), "n_train": len(train), "n_holdout": len(held),
            "target": "SPADE's distribution over each prompt's decision set (token level)",
            "target_agreement": target_agreement, "confidence": confidence, "bound": "Clopper-Pearson, one-sided",
            "steps": steps, "lr": lr, "seconds": round(time.perf_counter() - t0, 1),
        },
        curves={k: [p.__dict__ for p in v] for k, v in curves.items()},
        layer_stats=layer_stats,
    )
    out = _write(Path(out_dir), manifest, {
        "lspade.onnx": export_onnx(lspade, engine.head.norm_weight, engine.index.rms_eps),
        "tuned.onnx": export_onnx(tuned, engine.head.norm_weight, engine.index.rms_eps),
    })
    return CalibrationResult(manifest, out)


def _ce(head: LayerHead, samples: list[Sample], layer: int, rt: Runtime) -> float:
    vocab, mask, logits, hidden = _stack(samples, layer, "spade")
    engine = rt.engine
    q = masked_log_softmax(head_logits(head, hidden, engine.head.rows(vocab), engine.head.norm_weight,
                                       engine.index.rms_eps), mask)
    p = np.exp(masked_log_softmax(logits.astype(np.float64), mask))
    return float(-(np.where(mask, p * np.where(mask, q, 0.0), 0.0)).sum() / len(samples))


def _write(out_dir: Path, manifest: HeadsManifest, files: dict[str, bytes]) -> Path:
    """Write into a temporary sibling folder, then swap it in: never a half-written heads folder."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    for name, data in files.items():
        (tmp / name).write_bytes(data)
    manifest.hashes = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    (tmp / "heads.json").write_text(json.dumps(manifest.to_dict(), indent=1))
    if out_dir.exists():
        for name in [*files, "heads.json"]:
            (out_dir / name).unlink(missing_ok=True)
        for child in tmp.iterdir():
            child.replace(out_dir / child.name)
        shutil.rmtree(tmp)
    else:
        tmp.replace(out_dir)
    log.info("wrote heads to %s", out_dir)
    return out_dir
