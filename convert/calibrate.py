"""`edge-spade calibrate`: L-SPADE heads and exit thresholds for one model, from unlabeled prompts.

1. Collect: one trace pass per prompt keeps the answer row after every layer; SPADE at every
   layer gives its logits (choice questions: over the decision set; free answers: the top-k
   tokens of the vocabulary). Each prompt is cached on disk (keyed by the model's output
   fingerprint, the tail width and the prompt), so an interrupted run resumes where it stopped.
2. Train per layer, in numpy: L-SPADE (target: SPADE's distribution at that layer) and the
   tuned lens (target: the full model's), over each prompt's own decision set (free answers:
   over every candidate token, SPADE's top-k carrying the target).
3. Pick each threshold on a held-out split: the largest whose agreement with the full model is
   at least the target with the requested confidence (one-sided Clopper-Pearson lower bound),
   with each head's domain gate in place (it decides only on states like the training prompts'
   at its layer: edge_spade/domain.py).
4. Export one head set per answer kind found in the data ("choice", "free"): ONNX files, domain
   gates and `heads.json`, written to a temporary folder and swapped in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edge_spade.domain import gates_to_bytes
from edge_spade.errors import LayerError
from edge_spade.heads import FREE_TOP_K
from edge_spade.manifest import HEADS_FORMAT, HeadSet, HeadsManifest
from edge_spade.runtime import Runtime

from . import domain_gates
from .certify import exit_curve, keys_of, pick_threshold, split
from .costs import measure_check_ms, measure_costs, tail_costs
from .datasets import Item
from .heads_files import default_report_dir, kept_heads, kept_reports, write_heads, write_report
from .heads_train import LayerHead, judge, train_heads
from .length_plans import MIN_PROMPTS_PER_RANGE, measure_full_by_length, plans_by_length
from .onnx_export import ONNX_OPSET, export_onnx
from .plan import choose_tail, free_candidates, frontier_row, probe_plan, thin_layers
from .trace import Sample, collect

log = logging.getLogger(__name__)


def calibrate_set(
    rt: Runtime,
    samples: list[Sample],
    kind: str,
    layers: list[int],
    *,
    holdout: float,
    target_agreement: float,
    confidence: float,
    rank: int,
    steps: int,
    lr: float,
    tail: int,
    top_k: int,
    seed: int,
    data_names: list[str],
    plan: dict | None = None,
    frontier: dict | None = None,
    max_overhead: float = 0.03,
    by_key: bool = True,
    few_shot: Sequence[int] | None = None,
) -> tuple[HeadSet, dict[str, bytes], dict, dict[str, bytes]]:
    """One answer kind: train the heads, certify the thresholds, export.

    Returns the head set and its ONNX file (what the runtime loads), and its calibration report
    entry with the tuned-lens file (the baselines and curves the benchmarks compare against).
    """
    engine = rt.engine
    L = engine.n_layers
    plan = plan or {}
    train, held = split(samples, holdout, seed, by_key)
    t0 = time.perf_counter()
    candidates = free_candidates(train) if kind == "free" else None
    lspade = train_heads(rt, train, layers, "spade", rank, steps, lr, candidates)
    tuned = train_heads(rt, train, layers, "full", rank, steps, lr, candidates)
    identity = [LayerHead.identity(engine.n_embd, 1) for _ in layers]
    full = np.array([s.answer(L - 1) for s in held])
    spade_answers = np.array([[s.answer(layer) for layer in layers] for s in held])
    costs = dict(plan.get("costs", {}))
    # Each head decides only on states like the training prompts' (edge_spade/domain.py): outside its
    # gate a prompt's entropy is infinite, so thresholds are picked and certified as the runtime runs them.
    train_states = np.stack([s.hidden[layers] for s in train])
    gates = domain_gates.fit_gates(train_states, layers)
    train_in = domain_gates.inside(gates, train_states, layers)
    held_in = domain_gates.inside(gates, np.stack([s.hidden[layers] for s in held]), layers)
    train_ent, _ = judge(rt, lspade, layers, train, top_k, candidates)
    train_ent = np.where(train_in, train_ent, np.inf)
    if "full_ms" in costs:  # an L-SPADE exit runs its tail on the whole model
        exit_cost = (np.array(layers) + 1) / L + costs["tail_ms"] / costs["full_ms"]
        eval_layers = thin_layers(
            train,
            train_ent,
            layers,
            L,
            target_agreement,
            confidence,
            exit_cost,
            costs.get("check_ms", 0.0) / costs.get("check_full_ms", costs["full_ms"]),
            max_overhead,
            by_key,
        )
    else:
        eval_layers = list(layers)
    cols = [layers.index(layer) for layer in eval_layers]  # the lens baselines are judged on the same layers
    curves, thresholds, held_keys = {}, {}, keys_of(held, by_key)
    for name, heads in (("lspade", lspade), ("tuned", tuned), ("logit_lens", identity)):
        ent, own = judge(rt, heads, layers, held, top_k, candidates)
        if name == "lspade":  # the lens baselines are the paper's rules, ungated
            ent = np.where(held_in, ent, np.inf)
        answers = spade_answers if name == "lspade" else own  # lens baselines answer from their own head
        curves[name] = exit_curve(full, answers[:, cols], ent[:, cols], eval_layers, L, confidence, held_keys)
        thresholds[name] = pick_threshold(curves[name], target_agreement)
        if name == "lspade":
            lspade_held_ent = ent[:, cols]
            layer_stats = [
                {
                    "layer": layer,
                    "spade_agree_full": float((spade_answers[:, j] == full).mean()),
                    "lspade_agree_spade": float((own[:, j] == spade_answers[:, j]).mean()),
                    "mean_entropy": float(ent[:, j].mean()),
                }
                for j, layer in enumerate(layers)
            ]
    if plan.get("curve"):
        curves["spade"] = plan["curve"]
    thresholds["spade"] = plan.get("threshold", -1.0)
    head_set = HeadSet(
        kind=kind,
        file=f"lspade-{kind}.onnx",
        layers=layers,
        eval_layers=eval_layers,
        threshold=thresholds["lspade"],
        thresholds={name: thresholds[name] for name in ("lspade", "spade")},
        tail=tail,
        top_k=top_k if kind == "free" else None,
        candidates=candidates.tolist() if candidates is not None else None,
        calibration={
            "data": data_names,
            **({"few_shot": list(few_shot)} if few_shot and kind == "free" else {}),
            "n_prompts": len(samples),
            "n_train": len(train),
            "n_holdout": len(held),
            "holdout_by": "fact" if by_key else "prompt",
            "target": (
                "SPADE's distribution over each prompt's decision set"
                if kind == "choice"
                else f"SPADE's distribution over its top-{top_k} tokens at the same layer, scored over every "
                "candidate token"
            ),
            "target_agreement": target_agreement,
            "confidence": confidence,
            "bound": (
                "Clopper-Pearson, one-sided, over held-out facts (a fact agrees when all its prompts do)"
                if by_key
                else "Clopper-Pearson, one-sided, over held-out prompts"
            ),
            "min_exit_rate": 0.05,
            "max_overhead": max_overhead,
            "probe_objective": plan.get("objective", "median"),
            "steps": steps,
            "lr": lr,
            "train_seconds": round(time.perf_counter() - t0, 1),
        },
        signal="spade" if plan.get("pays") else "lspade",
        probe_layers=plan.get("probe_layers", []),
        costs=costs,
        domain=domain_gates.entry(
            f"domain-{kind}.npz",
            eval_layers,
            domain_gates.QUANTILE,
            {
                "train": round(float(train_in[:, cols].all(1).mean()), 4),
                "held_out": round(float(held_in[:, cols].all(1).mean()), 4),
            },
        ),
    )
    if "length_fit" in plan:
        head_set.plans = default_rule_plans(head_set, held, lspade_held_ent, L, plan["length_fit"], by_key)
        head_set.costs["length_fit"] = plan["length_fit"]
    tuned_file = f"tuned-{kind}.onnx"
    report = {
        "tuned_file": tuned_file,
        "thresholds": {name: thresholds[name] for name in ("tuned", "logit_lens")},
        "curves": {k: [p.__dict__ for p in v] for k, v in curves.items()},
        "layer_stats": layer_stats,
        "tail_frontier": frontier or {},
    }
    norm, eps = engine.head.norm_weight, engine.index.rms_eps
    return (
        head_set,
        {
            head_set.file: export_onnx(lspade, norm, eps),
            head_set.domain["file"]: gates_to_bytes({layer: gates[layer] for layer in eval_layers}),
        },
        report,
        {tuned_file: export_onnx(tuned, norm, eps)},
    )


def default_rule_plans(
    head_set: HeadSet,
    held: list[Sample],
    lspade_ent: np.ndarray,
    n_layers: int,
    fit: dict[str, float],
    by_key: bool = True,
) -> list[dict]:
    """Plans per prompt length for the set's default rule, from its exits on the held-out prompts.

    Probes: each costs its tail (on a tail model, or on the whole model in a one-question process)
    and its exit is the answer. L-SPADE: each check costs `check_ms` and an exit adds a SPADE tail
    on the whole model. A rule that never exits needs no plan (it runs no hooks).

    A range holding enough held-out prompts gets a threshold of its own, certified on those prompts
    alone (the same bound, over their facts): the promise then holds per prompt length, not only on
    average over lengths. A range that cannot certify any exit does not check.
    """
    costs = head_set.costs
    if head_set.signal == "spade":
        layers, tau = head_set.probe_layers, head_set.thresholds["spade"]
        ent = np.array([[s.entropy(layer, head_set.top_k or FREE_TOP_K) for layer in layers] for s in held])
        check = list(tail_costs(costs, layers, n_layers) * costs["full_ms"])
        check_whole, after, after_whole = [costs["tail_ms"]] * len(layers), [0.0] * len(layers), [0.0] * len(layers)
    else:
        layers, tau, ent = head_set.eval_layers, head_set.threshold, lspade_ent
        check = check_whole = [costs.get("check_ms", 0.0)] * len(layers)
        after = after_whole = [costs["tail_ms"]] * len(layers)
    if tau < 0 or not layers:
        return []
    full = np.array([s.answer(n_layers - 1) for s in held])
    answers = np.array([[s.answer(layer) for layer in layers] for s in held])
    lengths = np.array([s.n_tokens for s in held])
    keys = keys_of(held, by_key)
    target, confidence = head_set.calibration["target_agreement"], head_set.calibration["confidence"]

    def shares(mask: np.ndarray, threshold: float) -> list[tuple[int, float]]:
        if threshold < 0:
            return []
        exits = ent[mask] <= threshold
        first = np.where(exits.any(axis=1), exits.argmax(axis=1), -1)
        return [(j, float((first == j).mean())) for j in range(len(layers)) if (first == j).any()]

    def exits_for(lo: int, hi: int | None) -> tuple[list[tuple[int, float]], int, dict]:
        mask = (lengths >= lo) & (lengths <= (hi if hi is not None else np.inf))
        if mask.sum() < MIN_PROMPTS_PER_RANGE:
            return [], int(mask.sum()), {}
        range_keys = [k for k, m in zip(keys, mask) if m] if keys is not None else None
        curve = exit_curve(full[mask], answers[mask], ent[mask], layers, n_layers, confidence, range_keys)
        threshold = pick_threshold(curve, target)
        return shares(mask, threshold), int(mask.sum()), {"threshold": threshold}

    return plans_by_length(
        fit,
        shares(np.ones(len(held), bool), tau),
        layers,
        n_layers,
        check,
        after,
        check_whole,
        after_whole,
        exits_for=exits_for,
    )


def calibrate(
    rt: Runtime,
    items: list[Item],
    out_dir: str | Path,
    *,
    data_names: list[str],
    min_layer: int = 1,
    max_layer: int | None = None,
    holdout: float = 0.3,
    target_agreement: float = 0.99,
    confidence: float = 0.95,
    rank: int = 64,
    steps: int = 300,
    lr: float = 5e-3,
    tail: int | Sequence[int] = 1,
    free_tail: int | Sequence[int] | None = None,
    top_k: int = FREE_TOP_K,
    seed: int = 0,
    max_overhead: float = 0.03,
    holdout_by: str = "fact",
    merge: bool = False,
    few_shot: Sequence[int] | None = None,
    objective: str = "median",
    report_dir: str | Path | None = None,
    progress: Callable | None = None,
) -> HeadsManifest:
    """Collect, train, pick thresholds and export every answer kind present in `items`.

    `tail` / `free_tail`: one SPADE tail width, or several to choose from per answer kind
    (choose_tail over the held-out frontier, recorded in the manifest). `holdout_by="fact"` holds
    out whole facts (all few-shot variants of one); "prompt" splits prompts as they come. `merge`: keep the answer
    kinds these items do not cover from the heads already in `out_dir` (same model, same rank).
    `few_shot`: the prefix lengths the cloze items were built with, recorded with the free set.
    `objective`: what SPADE probe layers are chosen to speed up (choose_probes): "median" or "total".
    `min_layer`..`max_layer`: the layers that get heads (default: up to the one before the last);
    SPADE probes are chosen among all layers from `min_layer` on, since they need no head. Heads
    cost most of a calibration's training time, and late layers save little when they exit.
    `report_dir`: where the calibration report goes (curves, per-layer statistics, the tail-width
    frontier, the tuned-lens and logit-lens baselines); default: `<out_dir>-calibration` beside it.
    The heads folder holds only what the runtime loads.
    """
    if holdout_by not in ("fact", "prompt"):
        raise ValueError(f"holdout_by must be 'fact' or 'prompt', got {holdout_by!r}")
    by_key = holdout_by == "fact"
    engine = rt.engine
    kinds = {"choice" if item.choices else "free" for item in items}
    out_dir = Path(out_dir)
    report_dir = Path(report_dir) if report_dir is not None else default_report_dir(out_dir)
    kept_sets, kept_files = kept_heads(out_dir, engine.head.fingerprint(), rank, kinds) if merge else ({}, {})
    kept_report, kept_report_files = kept_reports(report_dir, set(kept_sets)) if merge else ({}, {})
    layers = list(range(min_layer, engine.n_layers - 1))
    last = engine.n_layers - 2 if max_layer is None else max_layer
    if not 0 <= min_layer <= last <= engine.n_layers - 2:
        raise LayerError(
            f"heads go on layers {min_layer}..{last}: give 0 <= --min-layer <= --max-layer <= "
            f"{engine.n_layers - 2} for this {engine.n_layers}-layer model"
        )
    head_layers = list(range(min_layer, last + 1))
    sets, files, reports, report_files = {}, {}, {}, {}
    widths = {"choice": _widths(tail), "free": _widths(free_tail or tail)}
    by_kind = {"choice": [i for i in items if i.choices], "free": [i for i in items if not i.choices]}
    for kind, kind_items in by_kind.items():
        if not kind_items:
            continue
        if len(kind_items) < 10:
            raise ValueError(f"calibrating {kind} answers needs at least 10 prompts, got {len(kind_items)}")
        by_k, plans, frontier = {}, {}, {}
        for k in widths[kind]:
            t0 = time.perf_counter()
            by_k[k] = collect(rt, kind_items, tail=k, progress=progress, top_k=top_k)
            log.info("collected %d %s prompts (tail %d) in %.0f s", len(by_k[k]), kind, k, time.perf_counter() - t0)
            costs = measure_costs(rt, kind_items, k)
            log.info(
                "%s, tail %d: full answer %.1f ms, SPADE tail %.1f ms on the whole model, %.1f ms above layer %d",
                kind,
                k,
                costs["full_ms"],
                costs["tail_ms"],
                costs["tail_mid_ms"],
                costs["tail_mid_layer"],
            )
            train, held = split(by_k[k], holdout, seed, by_key)
            plans[k] = probe_plan(
                train, held, layers, engine.n_layers, costs, top_k, target_agreement, confidence, by_key, objective
            )
            frontier[k] = frontier_row(held, layers, engine.n_layers, plans[k])
        k = choose_tail(frontier)
        log.info("%s answers: tail width %d chosen from %s", kind, k, sorted(frontier))
        train, _ = split(by_k[k], holdout, seed, by_key)
        check_ms, check_full_ms = measure_check_ms(
            rt, kind_items, free_candidates(train) if kind == "free" else None, rank
        )
        plans[k]["costs"].update(check_ms=check_ms, check_full_ms=check_full_ms)
        first = rt.prompt(kind_items[0].question, kind_items[0].choices)
        plans[k]["length_fit"] = measure_full_by_length(rt, first.tokens, first.ids)
        log.info(
            "%s answers: one L-SPADE check costs %.2f ms inside the pass (full answer %.1f ms)",
            kind,
            check_ms,
            check_full_ms,
        )
        sets[kind], kind_files, reports[kind], kind_report_files = calibrate_set(
            rt,
            by_k[k],
            kind,
            head_layers,
            holdout=holdout,
            target_agreement=target_agreement,
            confidence=confidence,
            rank=rank,
            steps=steps,
            lr=lr,
            tail=k,
            top_k=top_k,
            seed=seed,
            data_names=data_names,
            plan=plans[k],
            frontier={str(w): row for w, row in frontier.items()},
            max_overhead=max_overhead,
            by_key=by_key,
            few_shot=few_shot,
        )
        files.update(kind_files)
        report_files.update(kind_report_files)
    manifest = HeadsManifest(
        format=HEADS_FORMAT,
        model=rt.name,
        model_file=engine.path.name,
        output_fingerprint=engine.head.fingerprint(),
        arch=engine.arch.name,
        n_layers=engine.n_layers,
        n_embd=engine.n_embd,
        rank=rank,
        onnx_opset=ONNX_OPSET,
        dtype="float16",
        sets={**kept_sets, **sets},
    )
    write_heads(out_dir, manifest, {**kept_files, **files})
    write_report(report_dir, manifest, {**kept_report, **reports}, {**kept_report_files, **report_files})
    return manifest


def _widths(tail: int | Sequence[int]) -> list[int]:
    return sorted({tail} if isinstance(tail, int) else set(tail))


def calibrate_model(
    model: str | None,
    data: Sequence[str],
    out: str | Path | None = None,
    *,
    report: str | Path | None = None,
    limit: int | None = None,
    variants: int = 3,
    few_shot: Sequence[int] = (3,),
    threads: int | None = None,
    progress: Callable | None = None,
    cascade: bool = False,
    cascade_min_tokens: int = 32,
    cascade_probes: int = 2,
    **options,
) -> tuple[HeadsManifest, Path]:
    """`edge-spade calibrate`: load the model and the data files, calibrate, write the heads.

    `out` defaults to a bundle's own heads/ folder (recorded in its bundle.json afterwards);
    `options` go to `calibrate`. `cascade`: then add a cascade to the free-answer heads on the same
    prompts and split (convert/cascade.py; prompts up to `cascade_min_tokens` are not measured; up to
    `cascade_probes` probe layers);
    where the heads cannot carry one, the heads stay as calibrated and a warning says why.
    Returns the manifest (as written last) and the heads folder.
    """
    from edge_spade.bundle import HEADS_DIR, is_bundle, open_bundle
    from edge_spade.errors import QuestionError
    from edge_spade.runtime import load_model

    from .bundle_writer import record_heads
    from .datasets import load_items

    items = [item for path in data for item in load_items(path, limit=limit, variants=variants, few_shot=few_shot)]
    if cascade and all(item.choices for item in items):
        raise QuestionError("--cascade is for free answers, and the data has no free-answer prompts")
    bundle = open_bundle(model) if model and is_bundle(Path(model)) else None
    if out is None:
        if bundle is None:
            raise QuestionError("give --out (a heads folder), or a bundle as --model")
        out = bundle.folder / HEADS_DIR
    out = Path(out)
    rt = load_model(model, threads=threads, heads=False)
    try:
        manifest = calibrate(
            rt,
            items,
            out,
            data_names=[Path(p).name for p in data],
            few_shot=few_shot,
            report_dir=report,
            progress=progress,
            **options,
        )
    finally:
        rt.close()
    if cascade:
        holdout = options.get("holdout", 0.3)
        manifest = _add_cascade(model, out, report, items, holdout, cascade_min_tokens, cascade_probes, threads)
    if bundle and out.resolve() == bundle.folder / HEADS_DIR:
        record_heads(bundle)
    return manifest, out


def _add_cascade(
    model: str | None,
    out: Path,
    report: str | Path | None,
    items: list,
    holdout: float,
    min_tokens: int,
    max_probes: int,
    threads: int | None,
) -> HeadsManifest:
    """The cascade step of `calibrate --cascade` on the calibration's own items and split."""
    from edge_spade.manifest import load_manifest

    from .cascade import NoCascadeError, add_cascade

    report_dir = Path(report) if report is not None else default_report_dir(out)
    try:
        record = add_cascade(
            model,
            out,
            report_dir,
            holdout=holdout,
            min_tokens=min_tokens,
            threads=threads,
            items=items,
            max_probes=max_probes,
        )
        log.info("cascade added: %s", record["chosen_on_train"])
    except NoCascadeError as exc:
        log.warning("no cascade added: %s", exc)
    return load_manifest(out)
