"""Calibration traces: one prompt pass per prompt keeps the answer row after every layer, and
SPADE at every layer gives its logits (choice questions: over the decision set; free answers:
the top-k tokens of the vocabulary). Each prompt is cached on disk (keyed by the model's output
fingerprint, the tail width and the prompt), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_spade.cache import cache_dir
from edge_spade.errors import EdgeSpadeError
from edge_spade.heads import FREE_TOP_K, entropy, topk_entropy
from edge_spade.prompts import choice_logits
from edge_spade.runtime import Runtime

from .datasets import Item

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One calibration prompt: the answer row after every layer and SPADE's logits there.

    Choice prompts: `ids` (1, m) is the decision set, `groups` the choices. Free prompts: `ids`
    (n_layers, k) holds SPADE's top-k tokens at each layer. The last layer is the full model.
    """

    hidden: np.ndarray  # (n_layers, d)
    ids: np.ndarray  # (1, m) or (n_layers, k)
    logits: np.ndarray  # (n_layers, m or k)
    groups: tuple[tuple[int, ...], ...] = ()
    key: str = ""  # prompts with one key (variants of one fact) land on the same side of a split
    n_tokens: int = 0  # the prompt's length (plans by prompt length use the held-out exits per range)

    @property
    def free(self) -> bool:
        return not self.groups

    def layer_ids(self, layer: int) -> np.ndarray:
        return self.ids[0] if len(self.ids) == 1 else self.ids[layer]

    def choice(self, logits: np.ndarray) -> int:
        return int(np.argmax(choice_logits(logits, self.groups)))

    def entropy(self, layer: int, top_k: int) -> float:
        """SPADE's own entropy at `layer`, as a probe judges it (choices, or the top-k tokens)."""
        if self.free:
            return topk_entropy(self.logits[layer].astype(np.float64), top_k)
        return entropy(choice_logits(self.logits[layer], self.groups))

    def answer(self, layer: int) -> int:
        """SPADE's answer at `layer`: a choice index, or a token id for free prompts."""
        if self.free:
            return int(self.ids[layer][np.argmax(self.logits[layer])])
        return self.choice(self.logits[layer])


def collect(
    rt: Runtime, items: Iterable[Item], tail: int = 1, progress: Callable | None = None, top_k: int = FREE_TOP_K
) -> list[Sample]:
    """Trace + SPADE at every layer for each prompt (cached per prompt)."""
    engine = rt.engine
    folder = cache_dir() / "calibration" / engine.head.fingerprint()[:16] / f"tail{tail}"
    folder.mkdir(parents=True, exist_ok=True)
    items = list(items)
    samples = []
    for item in progress(items) if progress else items:
        try:
            prompt = rt.prompt(item.question, item.choices)
        except EdgeSpadeError as exc:  # e.g. a data item with a too-long or malformed question
            log.warning("skipping %s: %s", item.id, exc)
            continue
        ids = prompt.ids.tolist() if prompt.ids is not None else f"top{top_k}"
        key = hashlib.sha256(json.dumps([prompt.tokens, ids]).encode()).hexdigest()[:24]
        data, _ = load_or_make(folder / f"{key}.npz", lambda p=prompt: _trace_sample(engine, p, tail, top_k))
        samples.append(
            Sample(
                data["hidden"].astype(np.float32),
                data["ids"],
                data["logits"].astype(np.float32),
                prompt.groups,
                item.key or item.id,
                len(prompt.tokens),
            )
        )
    return samples


def load_or_make(path: Path, make: Callable[[], dict[str, np.ndarray]]) -> tuple[dict[str, np.ndarray], bool]:
    """One prompt's cached arrays: read from `path`, or made and written there whole (a temporary
    file swapped in, so an interrupted run leaves no half-written entry); and whether they were made now."""
    if path.exists():
        return dict(np.load(path)), False
    data = make()
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **data)
    tmp.replace(path)
    return data, True


def _trace_sample(engine, prompt, tail: int, top_k: int) -> dict[str, np.ndarray]:
    trace = engine.trace(prompt.tokens, prompt.ids, tail=tail)
    tokens = [prompt.tokens[r] for r in trace.tail_rows]
    per_layer = [
        engine.spade_tail(trace.states[layer], layer, prompt.ids, tokens) for layer in range(engine.n_layers - 1)
    ] + [trace.full.logits]
    if prompt.ids is not None:
        return {"hidden": trace.last, "ids": prompt.ids[None], "logits": np.stack(per_layer)}
    top = [np.argsort(-logits)[:top_k] for logits in per_layer]
    return {"hidden": trace.last, "ids": np.stack(top), "logits": np.stack([lg[t] for lg, t in zip(per_layer, top)])}
