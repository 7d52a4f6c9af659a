"""Every conversion proves itself: the checkpoint's own forward pass in numpy against llama.cpp's
logits on the file just written.

The forward pass is written from the architectures' definitions (Hugging Face's modeling code:
RMSNorm, rotate-half RoPE with its base and Llama 3 scaling, grouped-query attention, Qwen's
biases and Qwen 3's q/k norms, Gemma's sandwich norms, q/k norms and sliding windows), reading
`config.json` in either format itself, never through the converter's code, so that a mistake in
the converter cannot pass both. It reads the weights one tensor at a time (embedding rows by id,
the output matrix in row blocks), so it fits in memory for billion-parameter models. Only the
last position's logits are compared.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_spade.errors import CheckpointError

from .checkpoint import Checkpoint

log = logging.getLogger(__name__)

SENTENCE = "The capital of France is Paris, and the capital of Italy is Rome. One, two, three, four"
# Relative error max|ours - llama.cpp| / max|llama.cpp| allowed per written type: rounding only. A
# wrong RoPE base or missing Llama 3 factors measured 0.12-0.23 on tiny checkpoints.
TOLERANCE = {"F32": 2e-3, "F16": 1e-2, "BF16": 3e-2}
ROW_BLOCK = 8192


def _rms(x: np.ndarray, w: np.ndarray, eps: float, plus_one: bool) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * ((1.0 + w) if plus_one else w)


def _rope(cfg: dict[str, Any], kind: str) -> tuple[float, dict[str, Any]]:
    """(base, scaling) of one attention kind, from `rope_parameters` (transformers 5) or the 4.x keys."""
    params = cfg.get("rope_parameters")
    if params:
        entry = params.get(kind, params.get("full_attention")) if "rope_theta" not in params else params
        return float(entry["rope_theta"]), entry
    if kind == "sliding_attention":
        return float(cfg.get("rope_local_base_freq", 10000.0)), {}
    return float(cfg.get("rope_theta", 10000.0)), cfg.get("rope_scaling") or {}


def _inv_freq(base: float, head_dim: int, scaling: dict[str, Any]) -> np.ndarray:
    inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, low, high = (
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
        )
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return np.where(medium, (1 - smooth) * out / factor + smooth * out, out)
    return inv


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def reference_logits(folder: str | Path, ids: list[int]) -> np.ndarray:
    """The checkpoint's logits at the last of `ids`, float64, computed from its safetensors."""
    ckpt = Checkpoint(folder)
    cfg = ckpt.config
    W = lambda name: ckpt.tensor(name).astype(np.float64)  # noqa: E731 - one tensor at a time
    gemma = str(cfg.get("model_type", "")).startswith("gemma3")
    hidden, nh = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    nkv, hd = int(cfg.get("num_key_value_heads") or nh), int(cfg.get("head_dim") or hidden // nh)
    eps, n_layers, T = float(cfg["rms_norm_eps"]), int(cfg["num_hidden_layers"]), len(ids)
    x = np.stack([ckpt.rows("model.embed_tokens.weight", i, i + 1)[0] for i in ids]).astype(np.float64)
    if gemma:
        x = x * np.sqrt(hidden)
    pos = np.arange(T)
    pattern = int(cfg.get("sliding_window_pattern", 6))  # Gemma 3's default: every 6th layer global
    types = cfg.get("layer_types") or [
        "full_attention" if not gemma or (j + 1) % pattern == 0 else "sliding_attention" for j in range(n_layers)
    ]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sliding = gemma and types[i] == "sliding_attention"
        base, scaling = _rope(cfg, "sliding_attention" if sliding else "full_attention")
        ang = pos[:, None] * _inv_freq(base, hd, scaling)[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        h = _rms(x, W(p + "input_layernorm.weight"), eps, gemma)

        def proj(name: str, n: int, h=h, p=p) -> np.ndarray:
            y = h @ W(p + f"self_attn.{name}_proj.weight").T
            if p + f"self_attn.{name}_proj.bias" in ckpt:
                y = y + W(p + f"self_attn.{name}_proj.bias")
            return y.reshape(T, n, hd)

        q, k, v = proj("q", nh), proj("k", nkv), proj("v", nkv)
        if p + "self_attn.q_norm.weight" in ckpt:  # per-head q/k norms: Gemma 3 (1 + w), Qwen 3 (w)
            q = _rms(q, W(p + "self_attn.q_norm.weight"), eps, gemma)
            k = _rms(k, W(p + "self_attn.k_norm.weight"), eps, gemma)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        scale = float(cfg.get("query_pre_attn_scalar") or hd) ** -0.5 if gemma else hd**-0.5
        mask = pos[None, :] > pos[:, None]
        if sliding:
            mask |= pos[:, None] - pos[None, :] >= int(cfg["sliding_window"])
        out = np.empty((T, nh, hd))
        for head in range(nh):
            kv = head // (nh // nkv)
            s = np.where(mask, -np.inf, q[:, head] @ k[:, kv].T * scale)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, kv]
        o = out.reshape(T, nh * hd) @ W(p + "self_attn.o_proj.weight").T
        if gemma:
            x = x + _rms(o, W(p + "post_attention_layernorm.weight"), eps, True)
            h = _rms(x, W(p + "pre_feedforward_layernorm.weight"), eps, True)
        else:
            x = x + o
            h = _rms(x, W(p + "post_attention_layernorm.weight"), eps, False)
        g = h @ W(p + "mlp.gate_proj.weight").T
        g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) if gemma else g / (1 + np.exp(-g))
        f = (g * (h @ W(p + "mlp.up_proj.weight").T)) @ W(p + "mlp.down_proj.weight").T
        x = x + (_rms(f, W(p + "post_feedforward_layernorm.weight"), eps, True) if gemma else f)
    last = _rms(x[-1], W("model.norm.weight"), eps, gemma)
    head = "lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight"
    n_vocab = ckpt.shape(head)[0]
    return np.concatenate(
        [
            ckpt.rows(head, a, min(a + ROW_BLOCK, n_vocab)).astype(np.float64) @ last
            for a in range(0, n_vocab, ROW_BLOCK)
        ]
    )


def verify_conversion(folder: str | Path, gguf_path: str | Path, outtype: str) -> dict[str, Any]:
    """Compare llama.cpp on `gguf_path` with the checkpoint's own forward pass over SENTENCE.

    Returns what the bundle records; raises CheckpointError when the relative error is over the
    written type's tolerance (the caller may skip the check: `--no-verify`).
    """
    from edge_spade.engine import Engine, EngineSettings

    t0 = time.perf_counter()
    with Engine(gguf_path, EngineSettings(n_ctx=64, kv_type="f32", flash_attn=False)) as engine:
        ids = engine.tokenize(SENTENCE, parse_special=False)[:48]
        ours = engine.full(ids, None).logits.astype(np.float64)
    ref = reference_logits(folder, ids)[: len(ours)]
    error = float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))
    tolerance = TOLERANCE[outtype]
    result = {
        "sentence_tokens": len(ids),
        "relative_error": error,
        "tolerance": tolerance,
        "against": outtype,
        "top1_agrees": bool(np.argmax(ours) == np.argmax(ref)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    log.info(
        "verified %s against the checkpoint's own forward pass: relative error %.2e (tolerance %.0e)",
        Path(gguf_path).name,
        error,
        tolerance,
    )
    if not error <= tolerance:
        raise CheckpointError(
            f"the converted model's logits differ from the checkpoint's own by {error:.3g} (relative; tolerance "
            f"{tolerance:g} for {outtype}): the conversion is wrong for this checkpoint; --no-verify keeps it anyway"
        )
    return result
