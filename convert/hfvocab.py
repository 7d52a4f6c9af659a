"""A Hugging Face `tokenizer.json` as llama.cpp's tokenizer tables.

Two families cover the supported models:
- byte-level BPE (Llama 3, SmolLM2, Qwen2): llama.cpp's "gpt2" tokenizer, with a
  pre-tokenizer (`tokenizer.ggml.pre`) that llama.cpp knows by name;
- byte-fallback BPE converted from SentencePiece (Gemma 3): llama.cpp's "llama" (SPM)
  tokenizer, which merges by token score, so scores are the merge ranks.

llama.cpp's own converter names the pre-tokenizer by hashing the tokenization of a test string
with `transformers`; we read the pre-tokenizer's definition in tokenizer.json instead, which
needs no extra dependency and refuses what it does not recognise rather than guessing.
Merges, special-token ids, add-BOS flags and the chat template come from gguf's SpecialVocab.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from edge_spade.errors import CheckpointError

# Split regexes of the pre-tokenizers we map, as they appear in tokenizer.json.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_TO_PRE = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool
    folder: Path

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        writer.add_add_space_prefix(self.add_space_prefix)
        special = gguf.SpecialVocab(self.folder, load_merges=self.model == "gpt2", n_vocab=len(self.tokens))
        if self.model == "gpt2" and not special.merges:
            raise CheckpointError(f"{self.folder}/tokenizer.json has no BPE merges")
        special.add_to_gguf(writer, quiet=True)


def load_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Read tokenizer.json; `n_vocab` (the embedding rows) pads the table with unused entries."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json (a fast Hugging Face tokenizer is required)")
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
        model = tj["model"]
    except (ValueError, KeyError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a Hugging Face tokenizer file: {exc}") from None
    if model.get("type") != "BPE":
        raise CheckpointError(f"{path}: tokenizer type {model.get('type')!r} is not supported (BPE only)")
    byte_fallback = bool(model.get("byte_fallback"))
    if not byte_fallback and (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise CheckpointError(f"{path}: a BPE tokenizer without byte-level decoding or byte fallback is not supported")

    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    size = max(n_vocab, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = []
    for i, tok in enumerate(tokens):
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif byte_fallback and BYTE_TOKEN.fullmatch(tok):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    if byte_fallback:
        scores = _merge_rank_scores(tokens, model.get("merges", []), added)
        return Vocab(
            "llama", "default", tokens, scores, [int(t) for t in types], _prepends_space(tj.get("normalizer")), folder
        )
    return Vocab(
        "gpt2",
        _pre_tokenizer(tj.get("pre_tokenizer"), path),
        tokens,
        [0.0] * size,
        [int(t) for t in types],
        False,
        folder,
    )


def _merge_rank_scores(tokens: list[str], merges: list[Any], added: dict[int, Any]) -> list[float]:
    """SentencePiece merges the pair whose result scores highest: score = -(rank of the merge making it)."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    scores = []
    for i, tok in enumerate(tokens):
        if i in added:
            scores.append(-1000.0)
        elif tok in rank:
            scores.append(-float(rank[tok]))
        else:
            scores.append(0.0 if len(tok) == 1 or BYTE_TOKEN.fullmatch(tok) else -1e9)
    return scores


def _prepends_space(normalizer: dict | None) -> bool:
    """SentencePiece's dummy prefix appears in tokenizer.json as a Prepend('▁') normalizer."""
    if not normalizer:
        return False
    parts = normalizer.get("normalizers", [normalizer])
    return any(p.get("type") == "Prepend" and p.get("prepend") == "\u2581" for p in parts)


def _pre_tokenizer(pre: dict | None, path: Path) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, from its definition."""
    parts = (pre or {}).get("pretokenizers", [pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split" and "pattern" in p]
    if kinds == ["Split", "ByteLevel"] and splits[0] in SPLIT_TO_PRE:
        return SPLIT_TO_PRE[splits[0]]
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise CheckpointError(
        f"{path}: pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by name here; "
        f"supported: Llama 3 (llama-bpe), Qwen2 (qwen2), SmolLM (smollm), GPT-2 byte-level (gpt-2)"
    )
