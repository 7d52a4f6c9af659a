"""The heads manifest (`heads.json`): what the ONNX heads are, how they were made, which model they fit.

A heads folder holds one *head set* per answer kind: "choice" (the decision set is the choice
tokens) and "free" (the whole vocabulary; entropy over the top-k tokens). Each set has its
own layers, threshold, SPADE tail width and calibration record.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgeSpadeError
from .records import build

if TYPE_CHECKING:
    from .engine import Engine
    from .heads import OnnxHeads

HEADS_FORMAT = 2
KINDS = ("choice", "free")
# Format 1 kept the calibration report (curves, baselines) in heads.json; these keys are read and dropped.
_REPORT_KEYS_V1 = ("tuned_file", "curves", "layer_stats", "tail_frontier")


class HeadsMismatchError(EdgeSpadeError):
    """Heads made for another model, or a heads folder whose files do not match its manifest."""


OWN_THRESHOLDS = ("threshold", "probe_threshold", "inside_probe_threshold")  # a plan's, for its length range


@dataclass
class HeadSet:
    kind: str  # "choice" | "free"
    file: str  # L-SPADE heads (ONNX), one per layer in `layers`
    layers: list[int]
    eval_layers: list[int]  # layers checked by default
    threshold: float  # L-SPADE entropy threshold (nats); -1 = never exit
    thresholds: dict[str, float] = field(default_factory=dict)  # "lspade" (heads), "spade" (probes)
    tail: int = 1  # SPADE tail width used for targets and exits
    top_k: int | None = None  # free answers: entropy over the head's top-k tokens...
    candidates: list[int] | None = None  # ...among these token ids (SPADE's top tokens in calibration)
    calibration: dict = field(default_factory=dict)  # data, counts, target, bound: how the set was made
    signal: str = "lspade"  # the default exit: "lspade" (heads), "spade" (SPADE probes) or "cascade" (both)
    probe_layers: list[int] = field(default_factory=list)  # layers probed by the "spade" signal
    # The "cascade" signal: L-SPADE at "head_layers" (exit at or under "threshold"), then SPADE probes at
    # "probe_layers" (exit at or under "probe_threshold"), certified together; empty: no cascade. With
    # "inside" ({"probe_layers", "probe_threshold"}), prompts the domain gate admits probe there instead.
    cascade: dict = field(default_factory=dict)
    # Free-answer probes screen with the candidates' logits before the vocabulary's (policy.probe_checks):
    # set where calibration measured that it saves time (a large vocabulary's LM head), else off.
    screen_probes: bool = False
    costs: dict = field(default_factory=dict)  # measured ms: full answer, one tail (the probe cost model)
    # Where the heads may decide (edge_spade/domain.py): "file" (an .npz beside the ONNX file, hashed like
    # it), "layers", and how it was fitted; empty: no gate, every head decides on every prompt.
    domain: dict = field(default_factory=dict)
    # Per prompt-length range (ascending "max_tokens", the last None): whether checks pay, with tail
    # models ("check") and with whole-model probe tails ("check_whole_model"); none: always check.
    plans: list = field(default_factory=list)

    def plan_for(self, n_tokens: int, tail_models: bool = True) -> tuple[str, bool, dict[str, float]]:
        """(the plan's name, whether it checks, its own certified thresholds) for `n_tokens`: the
        thresholds (OWN_THRESHOLDS) certified on that length range alone, empty where the range had too
        few held-out prompts (the set's own then apply)."""
        lo = 1
        for plan in self.plans:
            hi = plan["max_tokens"]
            if hi is None or n_tokens <= hi:
                name = f"{self.kind}:{lo}-{hi}" if hi is not None else f"{self.kind}:{lo}+"
                own = {key: plan[key] for key in OWN_THRESHOLDS if key in plan}
                return name, bool(plan["check"] if tail_models else plan["check_whole_model"]), own
            lo = hi + 1
        return f"{self.kind}:all", True, {}

    @property
    def runs_heads(self) -> bool:
        """Whether the default rule runs L-SPADE heads (and so onnxruntime, where it checks)."""
        tau = {"lspade": self.threshold, "cascade": self.cascade.get("threshold", -1.0)}.get(self.signal, -1.0)
        return tau >= 0

    def head_index(self) -> dict[int, int]:
        return {layer: i for i, layer in enumerate(self.layers)}


@dataclass
class HeadsManifest:
    format: int
    model: str
    model_file: str
    output_fingerprint: str  # weights.OutputHead.fingerprint() of the model the heads were trained on
    arch: str
    n_layers: int
    n_embd: int
    rank: int
    onnx_opset: int
    dtype: str
    sets: dict[str, HeadSet]
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> HeadsManifest:
        raw = dict(raw)
        fmt = raw.get("format")
        if fmt not in (1, HEADS_FORMAT):
            raise HeadsMismatchError(f"{where}: heads format {fmt}, this edge-spade reads 1 and {HEADS_FORMAT}")
        sets = {k: dict(v) for k, v in raw.get("sets", {}).items()}
        if fmt == 1:
            for v in sets.values():
                for key in _REPORT_KEYS_V1:
                    v.pop(key, None)
        raw["sets"] = {k: build(HeadSet, v, f"{where} [sets.{k}]", HeadsMismatchError) for k, v in sets.items()}
        return build(cls, raw, where, HeadsMismatchError)


def load_manifest(folder: Path) -> HeadsManifest:
    path = folder / "heads.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeadsMismatchError(f"cannot read {path}: {exc}") from None
    return HeadsManifest.from_dict(raw, str(path))


def load_heads(
    folder: str | Path, engine: Engine, check_now: bool = True
) -> tuple[HeadsManifest, dict[str, OnnxHeads]]:
    """The manifest and one onnxruntime session per head set, after checking they fit `engine`'s model.

    `check_now=False` defers every session (and importing onnxruntime) to the first head that runs:
    a one-question process whose question is not checked never pays for it."""
    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.n_embd != engine.n_embd or manifest.n_layers != engine.n_layers:
        raise HeadsMismatchError(
            f"heads in {folder} were made for a {manifest.n_layers}-layer model with n_embd {manifest.n_embd} "
            f"({manifest.model}), not for {engine.path.name} ({engine.n_layers} layers, n_embd {engine.n_embd})"
        )
    if manifest.output_fingerprint != engine.head.fingerprint():
        raise HeadsMismatchError(
            f"heads in {folder} were calibrated on {manifest.model_file}, whose output matrix differs from "
            f"{engine.path.name}'s; calibrate for this model (edge-spade calibrate)"
        )
    sessions = {}
    for kind, head_set in manifest.sets.items():
        data = _hashed_file(folder, manifest, head_set.file)
        sessions[kind] = _checked_session(data, folder / head_set.file, head_set, engine.n_embd, check_now)
        if head_set.domain:
            sessions[kind].domain = _domain_gates(folder, manifest, head_set, engine.n_embd)
    return manifest, sessions


def _domain_gates(folder: Path, manifest: HeadsManifest, head_set: HeadSet, n_embd: int) -> dict:
    """A set's domain gates, from its hashed .npz (a file that is missing or altered is refused)."""
    from .domain import gates_from_bytes

    if not isinstance(head_set.domain.get("file"), str) or not isinstance(head_set.domain.get("layers"), list):
        raise HeadsMismatchError(f"{folder / 'heads.json'}: the {head_set.kind} set's domain needs a file and layers")
    data = _hashed_file(folder, manifest, head_set.domain["file"])
    return gates_from_bytes(data, list(head_set.domain["layers"]), n_embd, str(folder / head_set.domain["file"]))


def _hashed_file(folder: Path, manifest: HeadsManifest, name: str) -> bytes:
    """A file of the heads folder, refused when missing or not the one heads.json hashed."""
    path = folder / name
    data = path.read_bytes() if path.is_file() else None
    if data is None or hashlib.sha256(data).hexdigest() != manifest.hashes.get(name):
        raise HeadsMismatchError(f"{path} is missing or does not match its sha256 in heads.json")
    return data


def _checked_session(data: bytes, path: Path, head_set: HeadSet, n_embd: int, check_now: bool) -> OnnxHeads:
    """An onnxruntime session over `data`, checked by one run at its last layer: a file that does not
    parse, or whose heads have another width or fewer layers than heads.json says, is refused. A set
    whose default rule runs heads (an L-SPADE threshold it may exit at) is checked here, at load
    (unless not `check_now`); the others when a head first runs, with the same error."""
    import numpy as np

    from .heads import OnnxHeads

    def check(heads: OnnxHeads) -> None:
        out = heads.normed(np.zeros(n_embd, np.float32), len(head_set.layers) - 1)
        if out.shape != (n_embd,):
            raise HeadsMismatchError(f"{path} maps to {out.shape}, not ({n_embd},): heads for another model width")

    def unusable(exc: Exception) -> Exception:  # onnxruntime raises its own types for bad graphs and shapes
        if isinstance(exc, HeadsMismatchError):
            return exc
        return HeadsMismatchError(f"{path} is not a usable heads file for this model ({type(exc).__name__})")

    heads = OnnxHeads(data, check, unusable)
    if check_now and head_set.runs_heads:
        heads.session  # noqa: B018 - made and checked now, at load
    return heads
