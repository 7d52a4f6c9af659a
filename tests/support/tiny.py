"""A tiny random llama-architecture GGUF, and an independent numpy forward pass of it.

The numpy side is written from the architecture's definition (RMSNorm, RoPE on adjacent
pairs as llama.cpp's "normal" rope mode applies it, grouped-query causal attention, SwiGLU),
not from anything in edge_spade, so it can catch mistakes in the runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_LAYERS, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 4, 64, 4, 2, 128, 256
HEAD_DIM = N_EMBD // N_HEAD
ROPE_BASE, RMS_EPS = 10000.0, 1e-5

WORDS = [
    "the",
    "is",
    "of",
    "a",
    "capital",
    "france",
    "paris",
    "answer",
    "question",
    "yes",
    "no",
    "Yes",
    "No",
    "A",
    "B",
    "C",
    "D",
    "sky",
    "blue",
    "water",
    "wet",
    "Question",
    "Answer",
]


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    """SentencePiece-style vocab: 3 specials, 256 byte tokens, letters and a few words."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]  # UNKNOWN, CONTROL
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)  # BYTE
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + [":", "(", ")", ".", "?", "\n"]
    pieces += ["\u2581" + chr(c) for c in range(ord("a"), ord("z") + 1)]
    # Every prefix of every word, so that SentencePiece's pairwise merges can reach the word.
    pieces += [w[:i] for w in WORDS for i in range(2, len(w) + 1)]
    pieces += ["\u2581" + w[:i] for w in WORDS for i in range(1, len(w) + 1)]
    for i, piece in enumerate(dict.fromkeys(pieces)):
        if piece in tokens:
            continue
        tokens.append(piece)
        scores.append(-float(i) if len(piece) <= 2 else float(len(piece)))
        types.append(1)  # NORMAL
    return tokens, scores, types


@dataclass
class TinyWeights:
    embd: np.ndarray  # (n_vocab, n_embd)
    layers: list[dict[str, np.ndarray]]
    out_norm: np.ndarray
    output: np.ndarray  # (n_vocab, n_embd)


def make_weights(n_vocab: int, seed: int = 0) -> TinyWeights:
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    layers = []
    for _ in range(N_LAYERS):
        layers.append(
            {
                "attn_norm": (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32),
                "attn_q": mat(N_HEAD * HEAD_DIM, N_EMBD),
                "attn_k": mat(N_HEAD_KV * HEAD_DIM, N_EMBD),
                "attn_v": mat(N_HEAD_KV * HEAD_DIM, N_EMBD),
                "attn_output": mat(N_EMBD, N_HEAD * HEAD_DIM),
                "ffn_norm": (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32),
                "ffn_gate": mat(N_FF, N_EMBD),
                "ffn_up": mat(N_FF, N_EMBD),
                "ffn_down": mat(N_EMBD, N_FF),
            }
        )
    return TinyWeights(
        embd=rng.standard_normal((n_vocab, N_EMBD)).astype(np.float32),
        layers=layers,
        out_norm=(1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32),
        output=mat(n_vocab, N_EMBD) * 4,
    )


def write_tiny_gguf(path: Path, seed: int = 0) -> TinyWeights:
    """Write the model with gguf's writer; returns its weights for the numpy reference."""
    import gguf

    tokens, scores, types = vocabulary()
    w = make_weights(len(tokens), seed)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("edge-spade tiny test model")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYERS)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    writer.add_tensor("token_embd.weight", w.embd)
    for i, layer in enumerate(w.layers):
        for name, value in layer.items():
            writer.add_tensor(f"blk.{i}.{name}.weight", value)
    writer.add_tensor("output_norm.weight", w.out_norm)
    writer.add_tensor("output.weight", w.output)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w


# -- numpy reference (float64) ---------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS) * weight


def rope(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """x: (T, heads, head_dim); rotate adjacent pairs (2i, 2i+1) by pos * base^(-2i/d)."""
    inv = ROPE_BASE ** (-np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    ang = pos[:, None, None] * inv[None, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    out[..., 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    return out


def layer_forward(h: np.ndarray, p: dict[str, np.ndarray], pos: np.ndarray) -> np.ndarray:
    """One decoder layer over the rows of h (T, n_embd) as one causal sequence."""
    T = h.shape[0]
    x = rms_norm(h, p["attn_norm"])
    q = rope((x @ p["attn_q"].T).reshape(T, N_HEAD, HEAD_DIM), pos)
    k = rope((x @ p["attn_k"].T).reshape(T, N_HEAD_KV, HEAD_DIM), pos)
    v = (x @ p["attn_v"].T).reshape(T, N_HEAD_KV, HEAD_DIM)
    group = N_HEAD // N_HEAD_KV
    mask = np.triu(np.full((T, T), -np.inf), k=1)
    heads = []
    for hd in range(N_HEAD):
        kv = hd // group
        s = q[:, hd] @ k[:, kv].T / np.sqrt(HEAD_DIM) + mask
        a = np.exp(s - s.max(axis=1, keepdims=True))
        heads.append((a / a.sum(axis=1, keepdims=True)) @ v[:, kv])
    h = h + np.concatenate(heads, axis=1) @ p["attn_output"].T
    x = rms_norm(h, p["ffn_norm"])
    gate = x @ p["ffn_gate"].T
    return h + ((gate / (1 + np.exp(-gate))) * (x @ p["ffn_up"].T)) @ p["ffn_down"].T


def hidden_states(w: TinyWeights, tokens: list[int]) -> list[np.ndarray]:
    """The residual stream after each layer, (T, n_embd) each."""
    h = w.embd[tokens].astype(np.float64)
    pos = np.arange(len(tokens), dtype=np.float64)
    out = []
    for p in w.layers:
        h = layer_forward(h, {k: v.astype(np.float64) for k, v in p.items()}, pos)
        out.append(h)
    return out


def head(w: TinyWeights, h: np.ndarray) -> np.ndarray:
    return rms_norm(h, w.out_norm.astype(np.float64)) @ w.output.T.astype(np.float64)


def full_logits(w: TinyWeights, tokens: list[int]) -> np.ndarray:
    return head(w, hidden_states(w, tokens)[-1][-1])


def spade_logits(w: TinyWeights, tokens: list[int], layer: int, tail: int = 1) -> np.ndarray:
    """Start row + last `tail` rows after `layer`, run as a fresh sequence through the rest."""
    rows = sorted({0, *range(max(0, len(tokens) - tail), len(tokens))})
    h = hidden_states(w, tokens)[layer][rows]
    pos = np.arange(len(rows), dtype=np.float64)
    for p in w.layers[layer + 1 :]:
        h = layer_forward(h, {k: v.astype(np.float64) for k, v in p.items()}, pos)
    return head(w, h[-1])
