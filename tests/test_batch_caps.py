"""The cap per batch size (autocap.py): the cost model drops to plain batched decoding when a
wider verify costs more than speculation saves, and the rule maps any batch size to a measured
one."""

from __future__ import annotations

from mlx_specdec.autocap import CostModel, cap_for_batch, cap_or_plain, geometric_survival


def test_cap_or_plain_follows_the_verify_cost():
    survival = geometric_survival(0.7, 4)
    cheap = CostModel(256, {k: 10.0 + 0.1 * k for k in range(1, 6)}, {c: 1.0 for c in range(1, 5)})
    dear = CostModel(256, {k: 10.0 * k for k in range(1, 6)}, {c: 2.0 for c in range(1, 5)})
    assert cap_or_plain(cheap, survival) == 4  # memory-bound: the whole block pays
    assert cap_or_plain(dear, survival) == 0  # compute-bound: plain decoding is faster


def test_cap_for_batch_takes_the_largest_measured_size_below():
    rule = cap_for_batch({1: 5, 2: 3, 4: 0})
    assert [rule(b) for b in (1, 2, 3, 4, 7)] == [5, 3, 3, 0, 0]
