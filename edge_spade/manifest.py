"""The heads manifest (`heads.json`): what the ONNX heads are, how they were made, which model they fit."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgeSpadeError

if TYPE_CHECKING:
    from .engine import Engine

HEADS_FORMAT = 1


class HeadsMismatchError(EdgeSpadeError):
    """Heads made for another model, or a heads folder whose files do not match its manifest."""


@dataclass
class HeadsManifest:
    format: int
    model: str
    model_file: str
    output_fingerprint: str  # weights.OutputHead.fingerprint() of the model the heads were trained on
    arch: str
    n_layers: int
    n_embd: int
    layers: list[int]  # layers with a head, in ONNX index order
    eval_layers: list[int]  # layers checked by default
    threshold: float  # default L-SPADE entropy threshold (nats); -1 = never exit
    thresholds: dict[str, float] = field(default_factory=dict)  # per method: lspade, tuned, logit_lens
    tail: int = 1
    rank: int = 64
    onnx_opset: int = 17
    dtype: str = "float16"
    calibration: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)  # method -> [{threshold, agreement, lower_bound, mean_exit_layer}]
    layer_stats: list = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # file name -> sha256

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, where: str) -> "HeadsManifest":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise HeadsMismatchError(f"{where}: unknown key(s) {', '.join(unknown)}; made by a newer edge-spade?")
        try:
            manifest = cls(**raw)
        except TypeError as exc:
            raise HeadsMismatchError(f"{where}: incomplete manifest ({exc})") from None
        if manifest.format != HEADS_FORMAT:
            raise HeadsMismatchError(f"{where}: heads format {manifest.format}, this edge-spade reads {HEADS_FORMAT}")
        return manifest


def output_fingerprint(engine: "Engine") -> str:
    return engine.head.fingerprint()


def load_manifest(folder: Path) -> HeadsManifest:
    path = folder / "heads.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HeadsMismatchError(f"cannot read {path}: {exc}") from None
    return HeadsManifest.from_dict(raw, str(path))


def load_heads(folder: str | Path, engine: "Engine", name: str = "lspade.onnx"):
    """The manifest and an onnxruntime session for `name`, after checking they fit `engine`'s model."""
    from .heads import OnnxHeads

    folder = Path(folder)
    manifest = load_manifest(folder)
    if manifest.n_embd != engine.n_embd or manifest.n_layers != engine.n_layers:
        raise HeadsMismatchError(
            f"heads in {folder} were made for a {manifest.n_layers}-layer model with n_embd {manifest.n_embd} "
            f"({manifest.model}), not for {engine.path.name} ({engine.n_layers} layers, n_embd {engine.n_embd})")
    if manifest.output_fingerprint != output_fingerprint(engine):
        raise HeadsMismatchError(
            f"heads in {folder} were calibrated on {manifest.model_file}, whose output matrix differs from "
            f"{engine.path.name}'s; calibrate for this model (edge-spade calibrate)")
    data = (folder / name).read_bytes() if (folder / name).exists() else None
    if data is None or hashlib.sha256(data).hexdigest() != manifest.hashes.get(name):
        raise HeadsMismatchError(f"{folder / name} is missing or does not match its sha256 in heads.json")
    return manifest, OnnxHeads(data)
