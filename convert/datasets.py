"""Benchmark and calibration sets in their original formats, as uniform items.

ARC (jsonl: question.stem/choices, answerKey), BoolQ (jsonl: question, passage, answer),
HEAD-QA (json: exams -> data: qtext, answers, ra) and cloze facts (jsonl: prompt, answer,
category). The format is recognised from the content, not the file name.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edge_spade.errors import EdgeSpadeError


class DatasetError(EdgeSpadeError):
    """A data file in none of the known formats."""


Shot = dict[str, str]  # a cloze fact: {"prompt", "answer", ...}
# How people write a few-shot fact prompt: the calibration's cloze lines, `Q: ... A:` pairs, `... ->`
# arrows. Calibrating on several (`load_items(form=...)`, convert/cascade.py) certifies exits on them.
CLOZE_FORMATS: dict[str, Callable[[Sequence[Shot], Shot], str]] = {
    "cloze": lambda shots, r: "".join(f"{s['prompt']}{s['answer']}\n" for s in shots) + r["prompt"],
    "Q/A": lambda shots, r: "".join(f"Q: {s['prompt']}\nA:{s['answer']}\n" for s in shots) + f"Q: {r['prompt']}\nA:",
    "arrow": lambda shots, r: "".join(f"{s['prompt']} ->{s['answer']}\n" for s in shots) + f"{r['prompt']} ->",
}


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    choices: tuple[str, ...] | None  # None: a free single-token answer
    gold: int | str | None  # index into choices, or the expected token text (cloze)
    group: str = ""  # the data set (or cloze category)
    key: str = ""  # what prompts of one source share (the few-shot variants of a cloze fact); "" = id
    shots: int = 0  # the few-shot count a cloze prompt was written with
    form: str = "cloze"  # a cloze prompt's format (CLOZE_FORMATS)


def load_items(
    path: str | Path,
    limit: int | None = None,
    few_shot: int | Sequence[int] = 3,
    seed: int = 0,
    variants: int = 1,
    form: str = "cloze",
) -> list[Item]:
    """Items of one file; cloze prompts get a few-shot prefix from other items of their category
    (`variants` prefixes per fact and per count in `few_shot`, for calibration: all prompts of one
    fact share its key), written in the prompt format `form` (CLOZE_FORMATS; the same prefixes in
    every format, and ids with the format's name unless it is "cloze")."""
    if form not in CLOZE_FORMATS:
        raise DatasetError(f"unknown prompt format {form!r} (known: {', '.join(CLOZE_FORMATS)})")
    cloze = False
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if text.lstrip().startswith("{") and '"exams"' in text[:2000]:
        items = _headqa(json.loads(text), path.stem)
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as exc:
                    raise DatasetError(f"{path}, line {number}: not JSON ({exc})") from None
        if any(not isinstance(r, dict) for r in rows):
            raise DatasetError(f"{path}: every line must be a JSON object")
        if not rows:
            raise DatasetError(f"{path} holds no items")
        first = rows[0]
        if isinstance(first.get("question"), dict):
            items = [_arc(r, path.stem) for r in rows]
        elif "passage" in first and isinstance(first.get("answer"), bool):
            items = [_boolq(i, r) for i, r in enumerate(rows)]
        elif isinstance(first.get("question"), str):
            items = [_ask_line(i, r, path) for i, r in enumerate(rows)]
        elif {"prompt", "answer"} <= set(first):
            cloze = True
            counts = [few_shot] if isinstance(few_shot, int) else list(few_shot)
            if not counts or min(counts) < 0:
                raise DatasetError(f"few-shot counts must be zero or more, got {few_shot!r}")
            items = [
                item
                for n, shots in enumerate(counts)
                for v in range(variants if shots else 1)  # without a prefix every variant is the same prompt
                for item in _cloze(rows, shots, seed + v, f"-{shots}shot" * (n > 0) + f"-v{v}" * (v > 0), form)
            ]
        else:
            raise DatasetError(
                f"{path}: not `ask --file` lines, ARC, BoolQ, HEAD-QA or cloze facts (keys: {sorted(first)})"
            )
    if form != "cloze" and not cloze:
        raise DatasetError(f"{path}: prompt formats ({form!r}) are for cloze facts, not this file's questions")
    return items[:limit] if limit else items


def _ask_line(i: int, row: dict, path: Path) -> Item:
    """One `edge-spade ask --file` line, {"id"?, "question", "choices"?, "key"?}: a user's own questions,
    used as they are asked (no prefix). Lines that share a `key` are held out together."""
    choices = row.get("choices")
    if not isinstance(row.get("question"), str) or (
        choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices))
    ):
        raise DatasetError(f'{path}, line {i + 1}: expected {{"question": str, "choices"?: [str, ...]}}')
    ident = str(row.get("id", f"{path.stem}-{i}"))
    return Item(ident, row["question"], tuple(choices) if choices else None, None, path.stem, str(row.get("key", "")))


def _arc(row: dict, group: str) -> Item:
    choices = row["question"]["choices"]
    labels = [c["label"] for c in choices]
    gold = labels.index(row["answerKey"]) if row.get("answerKey") in labels else None
    return Item(row["id"], row["question"]["stem"], tuple(c["text"] for c in choices), gold, group)


def _boolq(i: int, row: dict) -> Item:
    q = row["question"].strip()
    question = f"{row['passage'].strip()}\n{q[:1].upper()}{q[1:]}?"
    return Item(f"boolq-{i}", question, ("yes", "no"), 0 if row["answer"] else 1, "boolq")


def _headqa(data: dict, group: str) -> list[Item]:
    items = []
    for exam in data["exams"].values():
        for q in exam["data"]:
            if q.get("image"):
                continue  # refers to an image that is not in the text release
            aids = [a["aid"] for a in q["answers"]]
            gold = aids.index(int(q["ra"])) if int(q["ra"]) in aids else None
            items.append(
                Item(f"{exam['name']}-{q['qid']}", q["qtext"], tuple(a["atext"] for a in q["answers"]), gold, group)
            )
    return items


def _cloze(rows: list[dict], few_shot: int, seed: int, suffix: str = "", form: str = "cloze") -> list[Item]:
    rng = random.Random(seed)
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r.get("category", ""), []).append(r)
    items = []
    for i, r in enumerate(rows):
        others = [o for o in by_cat[r.get("category", "")] if o is not r]
        shots = rng.sample(others, min(few_shot, len(others)))
        items.append(
            Item(
                r.get("id", "") + suffix + (f"-{form}" if form != "cloze" else ""),
                CLOZE_FORMATS[form](shots, r),
                None,
                r["answer"],
                r.get("category", ""),
                key=r.get("id") or f"row-{i}",
                shots=few_shot,
                form=form,
            )
        )
    return items
