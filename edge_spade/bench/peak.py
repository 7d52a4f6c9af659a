"""One mode's peak resident memory, measured in a process of its own (run by run.peak_rss):

    python -m edge_spade.bench.peak SETTINGS.json MODE

Loads what the mode needs, answers a few questions of the set, prints {"peak_rss_mb": ...}.
"""

from __future__ import annotations

import json
import sys

from .run import RSS_QUESTIONS, BenchSettings, LlamaCpp
from .sets import load_set


def peak_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)  # bytes on macOS, KiB on Linux


def main(argv: list[str]) -> int:
    raw = json.loads(open(argv[0]).read())
    raw["modes"] = tuple(raw["modes"])
    settings, mode = BenchSettings(**raw), argv[1]
    questions = load_set(settings.set)[:RSS_QUESTIONS]
    if mode == "llama-cpp":
        # The model's file, resolved the way `ask` resolves it, without loading it for answering.
        from edge_spade.engine import default_threads
        from edge_spade.prompts import format_question
        from edge_spade.registry import resolve_model

        llama = LlamaCpp(resolve_model(settings.model).path, settings.threads or default_threads(), settings.n_ctx)
        for q in questions:
            labels = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(q.choices)]) if q.choices else ()
            text = format_question(q.question, tuple(q.choices or ()), labels, chat=False)
            tokens = llama.llm.tokenize(text.encode(), add_bos=True, special=False)
            llama.answer(tokens, None, lambda logits: int(logits.argmax()))
    else:
        from edge_spade.runtime import load_model

        rt = load_model(settings.model, threads=settings.threads, heads=settings.heads, n_ctx=settings.n_ctx)
        for q in questions:
            rt.ask(q.question, q.choices, full=mode == "full")
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
