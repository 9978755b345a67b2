"""Budget rules: layer groups, uniform/Fisher rank allocation, within-group weights, cosine bottom-k."""
from __future__ import annotations

import pytest
import torch

from crosskv.core import budget


def test_layer_groups_last_group_smaller():
    assert budget.layer_groups(30, 4)[-1] == [28, 29]
    assert [len(g) for g in budget.layer_groups(30, 4)] == [4] * 7 + [2]
    assert sum(budget.layer_groups(30, 7), []) == list(range(30))


@pytest.mark.parametrize("size", [0, -1, 31])
def test_layer_groups_bad_size(size):
    with pytest.raises(ValueError, match=f"group_size={size}"):
        budget.layer_groups(30, size)


@pytest.mark.parametrize("value", [-0.01, 1.01, float("nan")])
def test_check_ratio_rejects_outside_unit_interval(value):
    with pytest.raises(ValueError, match="unmerged_ratio="):
        budget.check_ratio("unmerged_ratio", value)


def test_uniform_ranks_capped():
    assert budget.uniform_ranks(500, [576, 384]) == [500, 384]


def test_fisher_ranks_proportional_rounded_and_within_budget():
    sizes = [4] * 7 + [2]
    caps = [576] * 8
    fisher = [8.0, 8.0, 4.0, 4.0, 2.0, 2.0, 1.0, 0.2]  # per group sums; the last group has 2 layers
    ranks = budget.fisher_ranks(fisher, sizes, caps, rank_ratio=0.5, hidden=576)
    assert all(r % 32 == 0 and 32 <= r <= 576 for r in ranks)
    used = sum(s * r for s, r in zip(sizes, ranks))
    assert 0.5 * 576 * 30 - 32 * 4 <= used <= 0.5 * 576 * 30
    assert ranks == sorted(ranks, reverse=True)  # more Fisher → more rank (mean per layer is decreasing here)
    assert ranks[0] == 576  # capped at D, the excess handed to the others


def test_fisher_ranks_full_budget_is_full_rank():
    assert budget.fisher_ranks([3.0, 1.0, 2.0], [4, 4, 2], [576, 576, 576], 1.0, 576) == [576, 576, 576]


def test_fisher_ranks_bad_ratio():
    with pytest.raises(ValueError, match="rank_ratio=0"):
        budget.fisher_ranks([1.0], [4], [576], 0.0, 576)


def test_normalise_within_groups_sums_to_one():
    weights = budget.normalise_within_groups([1.0, 3.0, -2.0, 0.0, 0.0, 0.0], [[0, 1, 2, 3], [4, 5]])
    assert weights[:4] == pytest.approx([0.25, 0.75, 0.0, 0.0])
    assert weights[4:] == pytest.approx([0.5, 0.5])  # all zero → uniform


def test_global_bottom_k_gives_the_less_similar_group_more_unmerged():
    similar = torch.full((100,), 0.9) + torch.linspace(0, 0.05, 100)
    dissimilar = torch.full((100,), 0.2) + torch.linspace(0, 0.5, 100)  # overlaps nothing above 0.9
    masks = budget.global_bottom_k([similar, dissimilar], 0.4)
    assert int(masks[0].sum()) + int(masks[1].sum()) == 80
    assert int(masks[1].sum()) == 80 and int(masks[0].sum()) == 0
    fixed = budget.per_group_bottom_k([similar, dissimilar], 0.4)
    assert [int(m.sum()) for m in fixed] == [40, 40]
    assert masks[1][:80].all()  # the lowest scores of the dissimilar group stay unmerged


def test_global_bottom_k_extremes():
    scores = [torch.rand(10), torch.rand(5)]
    assert all(m.all() for m in budget.global_bottom_k(scores, 1.0))
    assert not any(m.any() for m in budget.global_bottom_k(scores, 0.0))
