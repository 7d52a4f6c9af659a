"""config.json as transformers 4.x and 5.x write it, read into one form.

transformers 5 keeps RoPE settings in `rope_parameters`: one dict (`{"rope_type", "rope_theta",
...}`) or one per attention kind (`{"full_attention": {...}, "sliding_attention": {...}}`), with
the top-level `rope_theta` and `rope_scaling` left out or null. The converter reads the 4.x keys
(`rope_theta`, `rope_scaling`, `rope_local_base_freq`), so `normalize_config` rewrites the 5.x
form into them. A setting that changes the math and that llama.cpp's graphs here do not follow
(another RoPE type, per-kind scaling of the local layers, an unknown attention kind, values
that disagree between the two forms) is a CheckpointError naming the key: never ignored.
"""

from __future__ import annotations

from typing import Any

from edge_spade.errors import CheckpointError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
ATTENTION_KINDS = ("full_attention", "sliding_attention")


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of `config` with RoPE settings in the 4.x keys, checked."""
    out = dict(config)
    if config.get("use_sliding_window") and config.get("model_type") != "gemma3_text":
        raise CheckpointError(
            "use_sliding_window is set: llama.cpp's graph for this architecture has no sliding window"
        )
    for i, kind in enumerate(config.get("layer_types") or ()):
        if kind not in ATTENTION_KINDS:
            raise CheckpointError(f"layer_types[{i}] {kind!r}: unknown attention kind (known: {ATTENTION_KINDS})")
    params = config.get("rope_parameters")
    if params is None:
        _check_scaling(out.get("rope_scaling"), "rope_scaling")
        return out
    if not isinstance(params, dict):
        raise CheckpointError(f"rope_parameters must be an object, got {type(params).__name__}")
    if "rope_theta" in params or "rope_type" in params:  # one set of parameters for every layer
        full, local = params, None
    else:
        unknown = sorted(set(params) - set(ATTENTION_KINDS))
        if unknown:
            raise CheckpointError(f"rope_parameters.{unknown[0]}: unknown attention kind (known: {ATTENTION_KINDS})")
        full, local = params.get("full_attention"), params.get("sliding_attention")
        if full is None:
            raise CheckpointError("rope_parameters has no full_attention entry")
    where = "rope_parameters" if local is None else "rope_parameters.full_attention"
    _set(out, "rope_theta", _theta(full, where), where)
    scaling = {k: v for k, v in full.items() if k != "rope_theta"}
    scaling = scaling if scaling.get("rope_type", "default") != "default" else None
    _check_scaling(scaling, where)
    if scaling is not None:
        if config.get("rope_scaling") not in (None, scaling):
            raise CheckpointError(f"rope_scaling and {where} disagree; keep one of them")
        out["rope_scaling"] = scaling
    if local is not None:
        if local.get("rope_type", "default") != "default":
            raise CheckpointError(
                f"rope_parameters.sliding_attention.rope_type {local['rope_type']!r}: llama.cpp scales no local layers"
            )
        _set(
            out,
            "rope_local_base_freq",
            _theta(local, "rope_parameters.sliding_attention"),
            "rope_parameters.sliding_attention",
        )
    return out


def _theta(params: dict[str, Any], where: str) -> float:
    try:
        return float(params["rope_theta"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{where}.rope_theta is missing or not a number") from None


def _set(out: dict[str, Any], key: str, value: float, where: str) -> None:
    if out.get(key) is not None and float(out[key]) != value:
        raise CheckpointError(f"{key} {out[key]} and {where}.rope_theta {value} disagree; keep one of them")
    out[key] = value


def _check_scaling(scaling: dict[str, Any] | None, where: str) -> None:
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in SUPPORTED_ROPE_TYPES:
        raise CheckpointError(f"{where} type {kind!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
