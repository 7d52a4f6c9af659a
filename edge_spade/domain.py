"""Where L-SPADE heads may decide: the hidden states their certificate was measured on.

A head's threshold is certified on held-out prompts drawn like its calibration prompts. On other
prompts it can be sure and wrong: the shipped layer-1 heads, calibrated on cloze lines, agreed
with full depth on about a third of the same facts written as `Q: ... A:` pairs or `... ->`
arrows (benchmarks/formats.py), because a layer-1 state mostly reflects the last token. A domain
gate keeps a head to states like its calibration's: the answer row's distance from the training
prompts' states (a Mahalanobis distance in their top principal directions, plus the scaled
residual outside them) must be at or under a quantile of the training prompts' own distances.
Outside, the head does not decide: the prompt goes on to a later check or to full depth. A gate
can only keep a prompt from exiting at a head, so it never lowers agreement under a heads-only
rule; a cascade's certificate is taken with its gate in place (convert/cascade.py).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass

import numpy as np

from .manifest import HeadsMismatchError


@dataclass(frozen=True)
class DomainGate:
    """One layer's gate: admits a state whose distance is at or under `threshold`."""

    mean: np.ndarray  # (d,)
    basis: np.ndarray  # (k, d): orthonormal principal directions of the training states
    inv_var: np.ndarray  # (k,): 1 / the variance along each
    inv_rest: float  # 1 / the mean variance of the directions left out
    threshold: float

    def distance(self, states: np.ndarray) -> np.ndarray:
        """Squared distances of (n, d) states (or one (d,) state: a 0-d array)."""
        x = np.asarray(states, np.float64) - self.mean
        inside = x @ self.basis.T
        residual = np.einsum("...d,...d->...", x, x) - np.einsum("...k,...k->...", inside, inside)
        return inside**2 @ self.inv_var + np.maximum(residual, 0.0) * self.inv_rest

    def admits(self, state: np.ndarray) -> bool:
        return bool(self.distance(state) <= self.threshold)


def fit_gate(states: np.ndarray, components: int, quantile: float) -> DomainGate:
    """A gate over training states (n, d): their mean and top principal directions, admitting the
    `quantile` of them that lie closest."""
    x = np.asarray(states, np.float64)
    n, d = x.shape
    k = min(components, n - 1, d - 1)
    if k < 1:
        raise ValueError(f"a domain gate needs at least 2 training states, got {n}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    var = s**2 / (n - 1)
    floor = max(float(var[0]) * 1e-9, 1e-12)  # a direction with no spread must not divide by zero
    rest = max(float(var[k:].sum() / (d - k)), floor)
    f32 = lambda a: np.asarray(a, np.float32).astype(np.float64)  # noqa: E731 - as the domain file stores them
    gate = DomainGate(f32(mean), f32(vt[:k]), f32(1.0 / np.maximum(var[:k], floor)), 1.0 / rest, 0.0)
    threshold = float(np.quantile(gate.distance(x), quantile))
    return DomainGate(gate.mean, gate.basis, gate.inv_var, gate.inv_rest, threshold)


def gates_to_bytes(gates: dict[int, DomainGate]) -> bytes:
    """The gates as one .npz (float32 arrays, no pickles): the heads folder's domain file."""
    arrays: dict[str, np.ndarray] = {}
    for layer, g in gates.items():
        arrays[f"{layer}.mean"] = g.mean.astype(np.float32)
        arrays[f"{layer}.basis"] = g.basis.astype(np.float32)
        arrays[f"{layer}.inv_var"] = g.inv_var.astype(np.float32)
        arrays[f"{layer}.scalars"] = np.array([g.inv_rest, g.threshold], np.float64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def gates_from_bytes(data: bytes, layers: list[int], n_embd: int, where: str) -> dict[int, DomainGate]:
    """The gates for `layers` from a domain file; a file without them, or for another width, is refused."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            gates = {}
            for layer in layers:
                mean, basis = z[f"{layer}.mean"].astype(np.float64), z[f"{layer}.basis"].astype(np.float64)
                inv_var, (inv_rest, threshold) = z[f"{layer}.inv_var"].astype(np.float64), z[f"{layer}.scalars"]
                if mean.shape != (n_embd,) or basis.shape != (len(inv_var), n_embd):
                    raise HeadsMismatchError(f"{where}: the domain gate at layer {layer} is not for width {n_embd}")
                gates[layer] = DomainGate(mean, basis, inv_var, float(inv_rest), float(threshold))
    except HeadsMismatchError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise HeadsMismatchError(f"{where} is not a usable domain file for these heads ({exc})") from None
    return gates
