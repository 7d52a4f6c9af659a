"""Domain gates for calibrated heads (edge_spade/domain.py): fitted on the training prompts' states,
applied to the prompts a certificate is taken on, written beside the heads.

A head is certified with its gate in place: a prompt outside the gate at a layer gets an infinite
entropy there, so it never exits at that head, as at run time. Both `edge-spade calibrate` (every
head layer) and the cascade tool (its head layers, on the prompts it measures) use these.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edge_spade.domain import DomainGate, fit_gate, gates_from_bytes, gates_to_bytes

COMPONENTS = 16  # a gate's principal directions
QUANTILE = 0.99  # ...admitting this share of the training prompts


def fit_gates(train_states: np.ndarray, layers: Sequence[int], quantile: float = QUANTILE) -> dict[int, DomainGate]:
    """One gate per layer from (n_train, len(layers), d) states, as the runtime will read them back."""
    fitted = {layer: fit_gate(train_states[:, j], COMPONENTS, quantile) for j, layer in enumerate(layers)}
    d = train_states.shape[-1]
    return gates_from_bytes(gates_to_bytes(fitted), list(layers), d, "domain gates")


def inside(gates: dict[int, DomainGate], states: np.ndarray, layers: Sequence[int]) -> np.ndarray:
    """(n, len(layers)) bool: whether each prompt's state at each layer lies inside that layer's gate."""
    return np.stack([gates[g].distance(states[:, j]) <= gates[g].threshold for j, g in enumerate(layers)], 1)


def entry(file: str, layers: Sequence[int], quantile: float, shares: dict[str, float]) -> dict:
    """The head set's `domain` entry: its file, layers, how the gates were fitted and what they admit."""
    return {"file": file, "layers": list(layers), "components": COMPONENTS, "quantile": quantile, "admitted": shares}
