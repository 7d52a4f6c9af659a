"""Probe planning by hand: the cost model, the choice of probe layers under the bound, the objectives."""

from __future__ import annotations

import numpy as np
import pytest

from edge_spade.convert.costs import probe_cost, tail_costs
from edge_spade.convert.plan import choose_probes


def test_probe_cost_and_choice_by_hand():

    ent = np.array([[0.1, 0.0], [2.0, 0.1], [2.0, 2.0], [0.2, 0.1]])
    cheap = np.array([0.1, 0.05])  # a probe higher up runs fewer layers on its tail model
    first, cost = probe_cost(ent, [1, 3], 0.5, n_layers=8, tail_cost=cheap)
    assert first.tolist() == [0, 1, -1, 0]
    np.testing.assert_allclose(cost, [2 / 8 + 0.1, 4 / 8 + 0.15, 1.0 + 0.15, 2 / 8 + 0.1])
    # Layer 1 is confident and right on samples 0 and 3, wrong on sample 1 unless it waits for layer 3.
    agree = np.array([[True, True], [False, True], [True, True], [True, True]])
    probes, tau = choose_probes(ent, agree, [1, 3], n_layers=8, tail_cost=cheap, target=1.0)
    idx = [[1, 3].index(p) for p in probes]
    first, cost = probe_cost(ent[:, idx], probes, tau, 8, cheap[idx])
    assert probes and np.median(1 / cost) > 1.0 and cost.mean() <= 1.0
    assert all(agree[i, [1, 3].index(probes[f])] for i, f in enumerate(first) if f >= 0)
    assert choose_probes(ent, agree, [1, 3], n_layers=8, tail_cost=np.array([2.0, 2.0]), target=1.0) == ([], -1.0)


def test_tail_cost_model_by_hand():

    # 8 layers; whole-model tail 30 ms (all 8 layers), tail model above layer 4 (3 layers) 15 ms:
    # 3 ms per layer, 6 ms fixed (LM head, graph); full answer 60 ms.
    costs = {"full_ms": 60.0, "tail_ms": 30.0, "tail_mid_ms": 15.0, "tail_mid_layer": 4}
    np.testing.assert_allclose(tail_costs(costs, [0, 4, 6], 8), np.array([6 + 21, 6 + 9, 6 + 3]) / 60)
    # measured before tail models: the whole-model tail everywhere
    np.testing.assert_allclose(tail_costs({"full_ms": 60.0, "tail_ms": 30.0}, [0, 6], 8), [0.5, 0.5])


def test_probe_choice_needs_the_bound_over_facts():
    """200 prompts that all exit right at a cheap probe: as 200 facts the 98% bound holds (0.985);
    as 50 facts of 4 prompts it cannot (0.942), so no probe is chosen."""
    ent, agree = np.zeros((200, 1)), np.ones((200, 1), bool)
    args = dict(layers=[2], n_layers=8, tail_cost=np.array([0.1]), target=0.98)
    assert choose_probes(ent, agree, **args, keys=[str(i) for i in range(200)])[0] == [2]
    assert choose_probes(ent, agree, **args, keys=[str(i // 4) for i in range(200)]) == ([], -1.0)
    assert choose_probes(ent, agree, **args)[0] == [2]  # no keys: the empirical rate, as before


def test_probe_objective_median_or_total_by_hand():
    """Layer 1 exits 4 of 10 prompts cheaply, layer 5 exits 9 of 10 late (8 layers, tails 0.1 of a
    full answer). The median wants layer 5 alone (1.18x; with layer 1 first it is 1.05x, since
    the 5 prompts that go on to layer 5 paid for two tails); the total wants both (1.36x vs 1.14x)."""
    ent = np.full((10, 2), 2.0)
    ent[:4, 0] = 0.0
    ent[:9, 1] = 0.0
    agree = ent == 0.0  # confident and right, or unsure and wrong
    args = dict(layers=[1, 5], n_layers=8, tail_cost=np.array([0.1, 0.1]), target=1.0)
    assert choose_probes(ent, agree, **args)[0] == [5]
    assert choose_probes(ent, agree, **args, objective="total")[0] == [1, 5]
    _, cost = probe_cost(ent, [1, 5], 0.0, 8, np.array([0.1, 0.1]))
    np.testing.assert_allclose([np.median(1 / cost), 1 / cost.mean()], [1 / 0.95, 10 / 7.35])
    with pytest.raises(ValueError, match="objective"):
        choose_probes(ent, agree, **args, objective="mean")
