"""Tiny random Hugging Face checkpoints (llama, qwen2, gemma3) and a numpy forward in HF conventions.

The forward pass follows the transformers modelling code (rotate-half RoPE, (1 + w) Gemma norms,
sandwich norms, q/k norms, sliding windows, Llama 3 RoPE scaling, tied embeddings) and reads the
weights straight from the safetensors files, so it shares nothing with edge_spade's converter.
Tokenizers are trained with the `tokenizers` library on a small corpus, in the same shapes as the
real models' tokenizer.json files.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome. The sky is blue.",
    "Question: Is water wet? Answer: yes. Question: Is fire cold? Answer: no.",
    "In 1969, 3 astronauts flew 384,400 km to the Moon; they didn't stay long!",
    "Les élèves étudient à l'école. Naïve café, über straße, 東京 is Tokyo, 北京 is Beijing.",
    "def add(a, b):\n    return a + b\n\n\nprint(add(12, 345))",
    "I'M sure you'll like it, we've seen it, they'd know. Emoji: 🙂 🚀",
    "A B C D. (A) red (B) green (C) blue (D) yellow. The answer is C.",
] * 3

TRICKY = [
    "Hello world",
    " leading space",
    "two  spaces and   three",
    "trailing space ",
    "tabs\tand\nnew\n\nlines",
    "digits 1234567 and 3.14159 and 1,000,000",
    "I'M don't we'll they've she'd",
    "unicode: naïve café über 東京 Ελληνικά",
    "emoji 🙂🚀 and symbols © ™ ∑",
    "   ",
    "The answer is",
]

SPLITS = {
    "llama3": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(style: str) -> tuple[Tokenizer, dict]:
    """Byte-level BPE shaped like Llama 3 ("llama3"), Qwen2 ("qwen2") or SmolLM2 ("smollm")."""
    tok = Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLITS[style]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": False, "chat_template": CHATML}
    return tok, config


def spm_tokenizer() -> tuple[Tokenizer, dict]:
    """Gemma-style: byte-fallback BPE over '▁'-joined text, as converted from SentencePiece."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = json.loads(trainer_tok.to_str())["model"]
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for t in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(t, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    turns = ["<start_of_turn>", "<end_of_turn>"]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + turns])
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
    }
    return tok, config


ARCH_CONFIG = {
    "llama": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        "tie_word_embeddings": False,
        "rope_theta": 10000.0,
    },
    "qwen2": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "head_dim": 48,  # not hidden / heads: the explicit head_dim path
        "attention_bias": False,
        "tie_word_embeddings": True,
        "rope_theta": 1000000.0,
    },
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "head_dim": 64,
        "query_pre_attn_scalar": 64,
        "sliding_window": 6,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "tie_word_embeddings": True,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    },
}
DTYPES = {"llama": np.float32, "qwen2": np.float16, "qwen3": np.float32, "gemma3": ml_dtypes.bfloat16}


def write_checkpoint(
    folder: Path,
    arch: str,
    *,
    seed: int = 0,
    hidden: int = 128,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    ff: int = 256,
    shards: int = 1,
    tokenizer: str | None = None,
) -> dict:
    """config.json, tokenizer files and random weights in safetensors (f32 / f16 / bf16 by arch).

    `tokenizer`: "spm", "llama3", "qwen2" or "smollm" (default: the architecture's own kind)."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or {"gemma3": "spm", "llama": "llama3", "qwen2": "qwen2", "qwen3": "qwen2"}[arch]
    tok, tok_config = spm_tokenizer() if tokenizer == "spm" else byte_level_tokenizer(tokenizer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
    n_vocab = tok.get_vocab_size() + 3  # padded embedding rows, as many real models have
    cfg = {
        **ARCH_CONFIG[arch],
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": n_vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "bos_token_id": tok.token_to_id(tok_config["bos_token"]),
        "eos_token_id": tok.token_to_id(tok_config["eos_token"]),
    }
    if arch == "gemma3":
        cfg["layer_types"] = (cfg["layer_types"] * layers)[:layers]
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    head_dim = cfg.get("head_dim", hidden // heads)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)) / np.sqrt(cols)

    def norm(n: int) -> np.ndarray:
        return (0.1 if arch == "gemma3" else 1.0) + 0.1 * rng.standard_normal(n)

    w = {"model.embed_tokens.weight": rng.standard_normal((n_vocab, hidden)), "model.norm.weight": norm(hidden)}
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = mat(n_vocab, hidden) * 4
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": norm(hidden),
            p + "post_attention_layernorm.weight": norm(hidden),
            p + "self_attn.q_proj.weight": mat(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": mat(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": mat(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": mat(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": mat(ff, hidden),
            p + "mlp.up_proj.weight": mat(ff, hidden),
            p + "mlp.down_proj.weight": mat(hidden, ff),
        }
        if arch == "qwen2":
            for n, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                w[p + f"self_attn.{n}_proj.bias"] = 0.5 * rng.standard_normal(rows * head_dim)
        if arch == "qwen3":
            w |= {p + "self_attn.q_norm.weight": norm(head_dim), p + "self_attn.k_norm.weight": norm(head_dim)}
        if arch == "gemma3":
            w |= {
                p + "pre_feedforward_layernorm.weight": norm(hidden),
                p + "post_feedforward_layernorm.weight": norm(hidden),
                p + "self_attn.q_norm.weight": norm(head_dim),
                p + "self_attn.k_norm.weight": norm(head_dim),
            }
    w = {k: v.astype(DTYPES[arch]) for k, v in w.items()}
    names = sorted(w)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(w, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for s, group in enumerate(groups):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: w[k] for k in group}, str(folder / fname))
            weight_map |= dict.fromkeys(group, fname)
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return cfg


def load_weights(folder: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out |= {k: np.asarray(v, dtype=np.float64) for k, v in load_file(str(f)).items()}
    return out


def _rms(x: np.ndarray, w: np.ndarray, eps: float, plus_one: bool) -> np.ndarray:
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * ((1.0 + w) if plus_one else w)


def _inv_freq(cfg: dict, head_dim: int, base: float) -> np.ndarray:
    inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    s = cfg.get("rope_scaling") or {}
    if s.get("rope_type") == "llama3":  # transformers' _compute_llama3_parameters
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        out = np.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * out / factor + smooth * out
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv = np.where(medium, smoothed, out)
    return inv


def _rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def hf_forward(folder: Path, ids: list[int]) -> np.ndarray:
    """Logits (T, vocab) of the checkpoint in `folder` for token ids, in float64."""
    cfg = json.loads((folder / "config.json").read_text())
    W = load_weights(folder)
    gemma = cfg["model_type"].startswith("gemma3")
    hidden, nh, nkv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or hidden // nh
    eps = cfg["rms_norm_eps"]
    T = len(ids)
    x = W["model.embed_tokens.weight"][ids]
    if gemma:
        x = x * np.sqrt(hidden)
    pos = np.arange(T)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = gemma and cfg["layer_types"][i] == "sliding_attention"
        base = cfg["rope_local_base_freq"] if sliding else cfg["rope_theta"]
        ang = pos[:, None] * _inv_freq(cfg, hd, base)[None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        h = _rms(x, W[p + "input_layernorm.weight"], eps, gemma)

        def proj(name: str, n: int, h=h, p=p) -> np.ndarray:
            y = h @ W[p + f"self_attn.{name}_proj.weight"].T
            if p + f"self_attn.{name}_proj.bias" in W:
                y = y + W[p + f"self_attn.{name}_proj.bias"]
            return y.reshape(T, n, hd)

        q, k, v = proj("q", nh), proj("k", nkv), proj("v", nkv)
        if p + "self_attn.q_norm.weight" in W:  # per-head q/k norms: Gemma 3 (1 + w), Qwen 3 (w)
            q = _rms(q, W[p + "self_attn.q_norm.weight"], eps, gemma)
            k = _rms(k, W[p + "self_attn.k_norm.weight"], eps, gemma)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        scale = cfg.get("query_pre_attn_scalar", hd) ** -0.5
        mask = pos[None, :] > pos[:, None]
        if sliding:
            mask |= pos[:, None] - pos[None, :] >= cfg["sliding_window"]
        out = np.empty((T, nh, hd))
        for hh in range(nh):
            kv = hh // (nh // nkv)
            s = q[:, hh] @ k[:, kv].T * scale
            s = np.where(mask, -np.inf, s)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[:, hh] = (a / a.sum(-1, keepdims=True)) @ v[:, kv]
        o = out.reshape(T, nh * hd) @ W[p + "self_attn.o_proj.weight"].T
        if gemma:
            x = x + _rms(o, W[p + "post_attention_layernorm.weight"], eps, True)
            h = _rms(x, W[p + "pre_feedforward_layernorm.weight"], eps, True)
        else:
            x = x + o
            h = _rms(x, W[p + "post_attention_layernorm.weight"], eps, False)
        g = h @ W[p + "mlp.gate_proj.weight"].T
        g = 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3))) if gemma else g / (1 + np.exp(-g))
        f = (g * (h @ W[p + "mlp.up_proj.weight"].T)) @ W[p + "mlp.down_proj.weight"].T
        x = x + (_rms(f, W[p + "post_feedforward_layernorm.weight"], eps, True) if gemma else f)
    x = _rms(x, W["model.norm.weight"], eps, gemma)
    return x @ W.get("lm_head.weight", W["model.embed_tokens.weight"]).T
