"""The question sets `edge-spade bench` ships, and users' own `ask --file` JSONL.

The shipped sets are cloze facts that no calibration saw (see convert/cloze/benchsets.py, which
writes them): free answers at 0, 3 and 8 shots, and choice questions. `mixed` takes them in turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

SETS = ("free-0", "free-3", "free-8", "choice")
NAMES = ("mixed", *SETS)


class SetError(ValueError):
    """A question set that cannot be used; the message says why."""


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    choices: tuple[str, ...] | None
    kind: str  # "free-0", "choice", ... or "free" / "choice" for a user's file


def load_set(spec: str) -> list[Question]:
    """A shipped set by name, or a JSONL file of `{"id"?, "question", "choices"?}` lines."""
    if spec in SETS:
        text = resources.files("edge_spade.bench").joinpath("sets", f"{spec}.jsonl").read_text(encoding="utf-8")
        return _parse(text, spec)
    if spec == "mixed":
        sets = [load_set(name) for name in SETS]
        return [q for row in zip(*sets) for q in row]
    path = Path(spec)
    if not path.is_file():
        raise SetError(f"{spec!r} is neither a question set ({', '.join(NAMES)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SetError(f"cannot read {path}: {exc}") from None
    return _parse(text, path.name)


def _parse(text: str, name: str) -> list[Question]:
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise SetError(f"{name}, line {number}: not JSON ({exc})") from None
        choices = row.get("choices") if isinstance(row, dict) else None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("question"), str)
            or not row["question"].strip()
            or (choices is not None and not (isinstance(choices, list) and all(isinstance(c, str) for c in choices)))
        ):
            raise SetError(f'{name}, line {number}: expected {{"question": "...", "choices"?: ["...", ...]}}')
        kind = row.get("kind") or ("choice" if choices else "free")
        out.append(
            Question(
                str(row.get("id", f"{name}-{number}")), row["question"], tuple(choices) if choices else None, str(kind)
            )
        )
    if not out:
        raise SetError(f"{name} holds no questions")
    return out
