"""Ambient further corruption: the kept mask is a subset (shared or independent columns), the
min_kept guard tops up exactly and uniformly, and the dropped-fraction statistic."""

import pytest
import torch

from depthdif_hpc.diffusion.ambient import ambient_stats, further_keep_mask
from tests.helpers import random_batch


def test_further_keep_mask_subset_and_shared_columns():
    b = random_batch(obs_frac=0.3)
    a = b["x_valid_mask"].float()
    g = torch.Generator().manual_seed(0)
    kept = further_keep_mask(a, 0.5, shared_spatial=True, min_kept=0, generator=g)
    assert torch.all(kept <= a)
    assert 0 < kept.sum() < a.sum()
    # shared spatial: a column is kept at all its observed depths or at none
    col_any = (kept > 0).any(1, keepdim=True)
    assert torch.equal(kept > 0, col_any & (a > 0))
    indep = further_keep_mask(a, 0.5, shared_spatial=False, min_kept=0, generator=g)
    assert torch.all(indep <= a)
    assert not torch.equal((indep > 0), (indep > 0).any(1, keepdim=True) & (a > 0))


def test_min_kept_guard_tops_up_exactly():
    a = torch.zeros(3, 4, 5, 5)
    a[0, :, 1, 1] = 1  # 4 observed elements
    a[1, :2, 2, 2] = 1  # 2 observed: n_min = min(3, 2) = 2
    # sample 2 has none: guard skipped
    for seed in range(5):
        kept = further_keep_mask(a, 0.999999, shared_spatial=True, min_kept=3,
                                 generator=torch.Generator().manual_seed(seed))
        assert torch.all(kept <= a)
        assert kept[0].sum() == 3 and kept[1].sum() == 2 and kept[2].sum() == 0
    # a guard that is already satisfied changes nothing
    kept = further_keep_mask(a, 0.0, shared_spatial=True, min_kept=3)
    assert torch.equal(kept, a)


def test_min_kept_guard_uniform_choice():
    a = torch.zeros(1, 1, 1, 6)
    a[..., :4] = 1
    counts = torch.zeros(6)
    g = torch.Generator().manual_seed(1)
    for _ in range(400):
        counts += further_keep_mask(a, 0.9999999, min_kept=1, generator=g).flatten()
    assert counts[4:].sum() == 0 and counts.sum() == 400
    assert counts[:4].min() > 60  # each of the 4 observed elements picked about 100 times


def test_ambient_stats():
    a = torch.ones(1, 1, 2, 2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    s = ambient_stats(a, k)
    assert float(s["ambient_dropped_fraction"]) == pytest.approx(0.75)
