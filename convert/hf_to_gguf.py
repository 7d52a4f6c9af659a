"""Hugging Face checkpoint -> GGUF (F32 / F16 / BF16), streamed one tensor at a time.

What differs between the supported architectures is data in `HF_ARCHS`; tensor names come
from gguf's `TensorNameMap`. The traps llama.cpp's own converter handles, handled here too:
- llama: q/k rows permuted from Hugging Face's rotate-half RoPE layout to llama.cpp's
  adjacent-pair layout (qwen2 and gemma3 use llama.cpp's NEOX RoPE: no permutation);
- gemma3: RMSNorm weights stored as w, applied as (1 + w) by Hugging Face: +1 at export;
- tied embeddings: no output.weight, llama.cpp reuses token_embd;
- Llama 3 RoPE scaling: per-frequency factors as a rope_freqs tensor; linear scaling as keys.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from edge_spade.errors import CheckpointError, UnsupportedArchitectureError

from .checkpoint import Checkpoint
from .hf_config import normalize_config
from .hfvocab import load_vocab

log = logging.getLogger(__name__)

OUT_TYPES = {
    "F32": gguf.GGMLQuantizationType.F32,
    "F16": gguf.GGMLQuantizationType.F16,
    "BF16": gguf.GGMLQuantizationType.BF16,
}
FILE_TYPES = {
    "F32": gguf.LlamaFileType.ALL_F32,
    "F16": gguf.LlamaFileType.MOSTLY_F16,
    "BF16": gguf.LlamaFileType.MOSTLY_BF16,
}


@dataclass(frozen=True)
class HFArch:
    hf_class: str  # config.json "architectures"[0]
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # rotate-half -> adjacent pairs (llama.cpp "normal" RoPE)
    norm_plus_one: bool = False  # Hugging Face applies (1 + w)


HF_ARCHS = {
    a.hf_class: a
    for a in (
        HFArch("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True),
        HFArch("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2),
        HFArch("Qwen3ForCausalLM", gguf.MODEL_ARCH.QWEN3),
        HFArch("Gemma3ForCausalLM", gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True),
    )
}


def hf_arch(config: dict[str, Any]) -> HFArch:
    names = config.get("architectures") or []
    for name in names:
        if name in HF_ARCHS:
            return HF_ARCHS[name]
    raise UnsupportedArchitectureError(
        f"cannot convert {'/'.join(names) or 'a model without config.architectures'}; "
        f"supported: {', '.join(HF_ARCHS)} (text models)"
    )


@dataclass
class Plan:
    """One output tensor: where it comes from and what is done to it."""

    name: str
    source: str | None  # checkpoint tensor, None for computed tensors
    shape: tuple[int, ...]  # numpy order (rows, cols)
    qtype: gguf.GGMLQuantizationType
    make: Callable[[], np.ndarray]
    streamable: bool = False  # copied as is: converted in row chunks, never whole in memory


STREAM_BYTES = 64 << 20  # float32 bytes per chunk of a streamed tensor


class _RowStream:
    """A large untransformed tensor, as GGUFWriter.write_tensor_data sees an array: its size, and
    `tofile` writing it chunk by chunk (embeddings of 128k-token vocabularies are ~1 GB in f32)."""

    def __init__(self, ckpt: Checkpoint, plan: Plan) -> None:
        self.ckpt, self.plan = ckpt, plan
        self.nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(plan.shape, plan.qtype)))

    def tofile(self, fp) -> None:
        rows, cols = self.plan.shape
        step = max(1, STREAM_BYTES // (4 * cols))
        for start in range(0, rows, step):
            chunk = self.ckpt.rows(self.plan.source, start, min(rows, start + step))
            gguf.quants.quantize(chunk, self.plan.qtype).tofile(fp)


def convert_checkpoint(
    folder: str | Path, out: str | Path, outtype: str = "F16", progress: Callable[[Iterable], Iterable] = lambda x: x
) -> Path:
    """Write `out` (a .gguf) from a Hugging Face folder; a partial file is never left behind."""
    if outtype not in OUT_TYPES:
        raise CheckpointError(f"output type {outtype!r}: choose one of {', '.join(OUT_TYPES)}")
    out = Path(out)
    ckpt = Checkpoint(folder)
    ckpt.config = normalize_config(ckpt.config)  # transformers 5's rope_parameters, read into the 4.x keys
    spec = hf_arch(ckpt.config)
    hp = _hparams(ckpt.config, spec)
    vocab = load_vocab(ckpt.folder, hp["vocab_size"])
    plans = _plan(ckpt, spec, hp, OUT_TYPES[outtype])
    tmp = out.with_name(f".{out.name}.part{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[spec.arch])
        _write_hparams(writer, spec, hp, ckpt.config)
        writer.add_file_type(FILE_TYPES[outtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to_gguf(writer)
        for p in plans:
            nbytes = int(np.prod(gguf.quant_shape_to_byte_shape(p.shape, p.qtype)))
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), nbytes, raw_dtype=p.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in progress(plans):
            writer.write_tensor_data(
                _RowStream(ckpt, p) if p.streamable else gguf.quants.quantize(p.make(), p.qtype).view(np.uint8)
            )
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _hparams(config: dict[str, Any], spec: HFArch) -> dict[str, Any]:
    try:
        n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])
        hp = {
            "n_layers": int(config["num_hidden_layers"]),
            "n_embd": n_embd,
            "n_ff": int(config["intermediate_size"]),
            "n_head": n_head,
            "n_head_kv": int(config.get("num_key_value_heads") or n_head),
            "head_dim": int(config.get("head_dim") or n_embd // n_head),
            "eps": float(config.get("rms_norm_eps", 1e-6)),
            "rope_theta": float(config.get("rope_theta", 10000.0)),
            "n_ctx": int(config.get("max_position_embeddings", 2048)),
            "vocab_size": int(config["vocab_size"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"config.json lacks or mangles a required field: {exc}") from None
    act = config.get("hidden_act") or config.get("hidden_activation")
    expected = "gelu_pytorch_tanh" if spec.arch == gguf.MODEL_ARCH.GEMMA3 else "silu"
    if act != expected:
        raise CheckpointError(f"hidden activation {act!r} is not supported for {spec.hf_class} (expected {expected})")
    if spec.arch == gguf.MODEL_ARCH.GEMMA3:
        scalar = config.get("query_pre_attn_scalar", hp["head_dim"])
        if scalar != hp["head_dim"]:
            raise CheckpointError(
                f"query_pre_attn_scalar {scalar} != head_dim {hp['head_dim']}: llama.cpp scales "
                "gemma3 queries by 1/sqrt(head_dim) for this size"
            )
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if config.get(key) is not None:
                raise CheckpointError(f"{key} is set; llama.cpp's gemma3 graph has no softcapping")
    return hp


def _rope_scaling(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or None
    if scaling is None:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ("default", None):
        return None
    if kind not in ("llama3", "linear"):
        raise CheckpointError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")
    return {**scaling, "kind": kind}


def llama3_rope_factors(config: dict[str, Any], head_dim: int) -> np.ndarray:
    """llama.cpp divides each RoPE frequency by its factor: factor = base freq / Llama-3 scaled freq."""
    s = _rope_scaling(config) or {}
    base = float(config.get("rope_theta", 10000.0))
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    factor, low, high = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    scaled = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return (inv_freq / scaled).astype(np.float32)


def _write_hparams(w: gguf.GGUFWriter, spec: HFArch, hp: dict[str, Any], config: dict[str, Any]) -> None:
    name = Path(str(config.get("_name_or_path") or "")).name
    if name:
        w.add_name(name)
    w.add_block_count(hp["n_layers"])
    w.add_context_length(hp["n_ctx"])
    w.add_embedding_length(hp["n_embd"])
    w.add_feed_forward_length(hp["n_ff"])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(hp["n_head_kv"])
    w.add_layer_norm_rms_eps(hp["eps"])
    w.add_rope_freq_base(hp["rope_theta"])
    w.add_vocab_size(hp["vocab_size"])
    if spec.arch == gguf.MODEL_ARCH.LLAMA:
        w.add_rope_dimension_count(hp["head_dim"])
    if spec.arch == gguf.MODEL_ARCH.GEMMA3 or hp["head_dim"] != hp["n_embd"] // hp["n_head"]:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])
    scaling = _rope_scaling(config)
    if scaling and scaling["kind"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    if spec.arch == gguf.MODEL_ARCH.GEMMA3:
        window = config.get("sliding_window")
        if window:
            w.add_sliding_window(int(window))
            types = config.get("layer_types") or [
                "full_attention" if (i + 1) % int(config.get("sliding_window_pattern", 6)) == 0 else "sliding_attention"
                for i in range(hp["n_layers"])
            ]
            w.add_sliding_window_pattern([t == "sliding_attention" for t in types])
        w.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10000.0)))


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rotate-half rows (x_i, x_{i+d/2}) -> adjacent pairs (x_2i, x_2i+1), per head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _plan(ckpt: Checkpoint, spec: HFArch, hp: dict[str, Any], qtype: gguf.GGMLQuantizationType) -> list[Plan]:
    names = gguf.get_tensor_name_map(spec.arch, hp["n_layers"])
    tied = bool(ckpt.config.get("tie_word_embeddings", spec.arch == gguf.MODEL_ARCH.GEMMA3))
    plans: list[Plan] = []
    for src in ckpt.names:
        if src.endswith("rotary_emb.inv_freq") or (tied and src == "lm_head.weight"):
            continue
        dst = names.get_name(src, try_suffixes=(".weight", ".bias"))
        if dst is None:
            raise CheckpointError(f"tensor {src} has no GGUF name for {spec.hf_class}; not a supported layout")
        shape = ckpt.shape(src)
        transform = _transform(src, dst, spec, hp)
        big = len(shape) == 2 and 4 * shape[0] * shape[1] > STREAM_BYTES and transform is _identity
        plans.append(
            Plan(
                dst,
                src,
                shape,
                qtype if len(shape) == 2 else gguf.GGMLQuantizationType.F32,
                lambda s=src, t=transform: t(ckpt.tensor(s)),
                streamable=big,
            )
        )
    have = {p.name for p in plans}
    required = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(hp["n_layers"]) for t in ("attn_q", "attn_k", "attn_v", "ffn_down")
    }
    missing = sorted(required - have)
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} required tensors, e.g. {', '.join(missing[:3])}")
    scaling = _rope_scaling(ckpt.config)
    if scaling and scaling["kind"] == "llama3":
        factors = llama3_rope_factors(ckpt.config, hp["head_dim"])
        plans.append(
            Plan(
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight",
                None,
                factors.shape,
                gguf.GGMLQuantizationType.F32,
                lambda f=factors: f,
            )
        )
    return plans


def _transform(src: str, dst: str, spec: HFArch, hp: dict[str, Any]) -> Callable[[np.ndarray], np.ndarray]:
    if spec.permute_qk and dst.endswith(("attn_q.weight", "attn_q.bias")):
        return lambda w: _permute(w, hp["n_head"])
    if spec.permute_qk and dst.endswith(("attn_k.weight", "attn_k.bias")):
        return lambda w: _permute(w, hp["n_head_kv"])
    if spec.norm_plus_one and src.endswith("norm.weight"):
        return lambda w: w + 1.0
    return _identity


def _identity(w: np.ndarray) -> np.ndarray:
    return w
