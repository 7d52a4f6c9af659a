"""Where the no-exit overhead of SPADE-EXIT goes: the eval callback, observing nodes, the checks.

    python -m benchmarks.hookcost --model gemma3-270m --out benchmarks/results/hookcost-gemma3-270m.json

Part 1, raw llama.cpp contexts on the engine's model, interleaved on the same prompts: no eval
callback; a callback that answers "no" for every node; one that reads the answer row of every
evaluation layer's `l_out` (the graph is then computed in pieces). Part 2, the shipped
free-answer check (ONNX head, candidate rows, top-k entropy) timed inside a prompt pass at every
evaluation layer, and the same calls in a loop outside any pass. Medians; ratios to no callback.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import data_path, progress, save_json
from edge_spade import hooks, load_model
from edge_spade.datasets import load_items
from edge_spade.heads import topk_entropy
from edge_spade.policy import ExitPolicy


def raw_contexts(engine, layers: list[int]) -> dict[str, object]:
    """name -> (llama context, its callback object kept alive)."""
    import llama_cpp as ll

    wanted = {engine.arch.layer_node(layer).encode() for layer in layers}
    row = np.empty(engine.n_embd, np.float32)
    get = engine._ggml.ggml_backend_tensor_get

    def ask_none(_t, _ask, _d):
        return False

    def read(t, ask, _d):
        name = ctypes.string_at(t + hooks.NAME_OFFSET)
        if ask or name not in wanted:
            return name in wanted
        g = hooks.GgmlTensor.from_address(t)
        get(t, row.ctypes.data, (int(g.ne[1]) - 1) * int(g.nb[1]), engine.n_embd * 4)
        return True

    out = {}
    for name, fn in (("no callback", None), ("callback, no node", ask_none), (f"read {len(layers)} nodes", read)):
        cp = ll.llama_context_default_params()
        cp.n_ctx = cp.n_batch = cp.n_ubatch = engine.n_ctx
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = engine._main.threads
        cp.no_perf = True
        cb = ll.ggml_backend_sched_eval_callback(fn) if fn else None
        if cb is not None:
            cp.cb_eval = cb
        out[name] = (ll.llama_init_from_model(engine._model, cp), cb)
    return out


def decode_ms(ctx, batch, tokens: list[int]) -> float:
    import llama_cpp as ll

    n = batch.n_tokens = len(tokens)
    for i, tok in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == n - 1
    ll.llama_memory_clear(ll.llama_get_memory(ctx), False)
    t0 = time.perf_counter()
    if ll.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")
    return (time.perf_counter() - t0) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--data", default="cloze/facts.jsonl")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--layers", type=int, nargs="*", default=None, help="observed layers (default: every layer)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    import llama_cpp as ll

    rt = load_model(args.model)
    engine = rt.engine
    layers = args.layers or list(range(1, engine.n_layers - 1))
    prompts = [rt.prompt(i.question, i.choices).tokens for i in load_items(data_path(args.data), limit=args.limit)]
    contexts = raw_contexts(engine, layers)
    batch = ll.llama_batch_init(engine.n_ctx, 0, 1)
    times: dict[str, list[float]] = {name: [] for name in contexts}
    try:
        for tokens in progress(prompts * args.repeat, len(prompts) * args.repeat, "raw passes"):
            for name, (ctx, _) in contexts.items():
                times[name].append(decode_ms(ctx, batch, tokens))
    finally:
        ll.llama_batch_free(batch)
        for ctx, _ in contexts.values():
            ll.llama_free(ctx)
    base = statistics.median(times["no callback"])
    passes = {name: {"median_ms": round(statistics.median(v), 2), "ratio": round(statistics.median(v) / base, 3)}
              for name, v in times.items()}

    result = {"model": rt.name, "prompt_tokens_median": float(np.median([len(t) for t in prompts])),
              "observed_layers": layers, "passes": passes}
    if rt.heads and "free" in rt.heads:  # part 2: the free-answer check inside and outside a pass
        head_set, heads = rt.manifest.sets["free"], rt.heads["free"]
        policy = ExitPolicy.from_head_set(head_set, 1e-12, signal="lspade")
        rows = engine.head.rows(np.array(policy.candidates))
        phases = {"inside": {"head": [], "rows": [], "entropy": []}, "outside": {"head": [], "rows": [], "entropy": []}}

        def check(where: str, states: np.ndarray, index: int) -> bool:
            t0 = time.perf_counter()
            normed = heads.normed(states[-1], index)
            t1 = time.perf_counter()
            logits = rows @ normed
            t2 = time.perf_counter()
            topk_entropy(logits, policy.top_k)
            t3 = time.perf_counter()
            for key, dt in zip(("head", "rows", "entropy"), (t1 - t0, t2 - t1, t3 - t2)):
                phases[where][key].append(dt * 1000)
            return False

        checks = {layer: (lambda s, i=policy.head_index[layer]: check("inside", s, i)) for layer in policy.eval_layers}
        for tokens in prompts * args.repeat:
            engine.early_exit(tokens, None, checks, tail=head_set.tail)
        hidden = np.random.default_rng(0).normal(size=(1, engine.n_embd)).astype(np.float32)
        for _ in range(200):
            check("outside", hidden, policy.head_index[policy.eval_layers[0]])
        result["free_check_ms"] = {where: {k: round(statistics.median(v), 3) for k, v in ph.items()}
                                   for where, ph in phases.items()}
        result["free_check_ms"]["candidates"] = len(policy.candidates)
        result["free_check_ms"]["eval_layers"] = list(policy.eval_layers)

    print(f"{rt.name}, {len(prompts)} prompts x {args.repeat}, median {result['prompt_tokens_median']:.0f} tokens")
    for name, v in passes.items():
        print(f"  {name:<22}{v['median_ms']:8.2f} ms  x{v['ratio']:.3f}")
    for where in ("inside", "outside"):
        if "free_check_ms" in result:
            ph = result["free_check_ms"][where]
            print(f"  free check {where:<8} head {ph['head']:.3f} ms, rows {ph['rows']:.3f} ms, entropy "
                  f"{ph['entropy']:.3f} ms")
    if args.out:
        save_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
