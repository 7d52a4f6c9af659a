"""What the runtime needs to know about each GGUF architecture, in one table.

All supported architectures name their graph nodes the same way (llama.cpp's `cb(cur, "l_out", il)`
and `result_norm`); what differs is recorded here as data rather than as `if arch == ...` branches.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Arch:
    name: str
    tested: bool  # exercised by the test suite on a real model
    layer_out: str = "l_out-{}"  # residual stream after layer il, one row per batch token
    final_norm: str = "result_norm"  # final RMSNorm times output_norm, before the LM head
    note: str = ""

    def layer_node(self, layer: int) -> str:
        return self.layer_out.format(layer)


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("llama", tested=True, note="SmolLM2, Llama 3.x"),
        Arch("gemma3", tested=True, note="Gemma 3 text models; embeddings scaled by sqrt(n_embd) on the token path"),
        Arch("qwen2", tested=True, note="tested on converted tiny random checkpoints (no real qwen2 model here)"),
        Arch("qwen3", tested=True, note="tested on converted tiny random checkpoints (no real qwen3 model here)"),
    )
}


def lookup_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        ) from None
