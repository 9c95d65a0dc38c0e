"""Ambient-occlusion further corruption (docs/model.md#ambient-occlusion), fully on the device.

A = observed support, K = Bernoulli keep mask (keep prob 1 - delta), A~ = A * K, then a per-sample
guard tops A~ up to n_min = min(min_kept, |A|) elements by choosing n_min - |A~| random entries
among ALL observed ones. The reference loops over samples on the host; here the choice is a
top-k over random scores with k = min_kept (a config constant), so shapes are static and nothing
waits for the host.
"""

from __future__ import annotations

import torch

from depthdif_hpc.diffusion import rng


def further_keep_mask(
    observed: torch.Tensor,
    drop_prob: float,
    *,
    shared_spatial: bool = True,
    min_kept: int = 1,
    generator: rng.RowGenerators = None,
) -> torch.Tensor:
    """Return A~ (same shape and dtype as the binary float mask `observed`, (B,C,H,W)), A~ <= A."""
    if observed.ndim != 4:
        raise ValueError(f"observed mask must be (B,C,H,W), got {tuple(observed.shape)}")
    b, c, h, w = observed.shape
    dev = observed.device
    keep_shape = (b, 1, h, w) if shared_spatial else (b, c, h, w)
    keep = (rng.rand(keep_shape, generator, device=dev) >= drop_prob).to(observed.dtype)
    kept = observed * keep
    if min_kept <= 0:
        return kept
    flat_obs = observed.reshape(b, -1)
    n_obs = flat_obs.sum(dim=1)
    n_kept = kept.reshape(b, -1).sum(dim=1)
    need = (torch.minimum(n_obs, torch.full_like(n_obs, float(min_kept))) - n_kept).clamp_min(0)
    k = min(min_kept, flat_obs.shape[1])
    # Observed entries get scores in [0, 1), the rest 2: the k smallest are observed whenever
    # enough exist, and the first `need` of them are a uniform draw among the observed.
    scores = rng.rand(flat_obs.shape, generator, device=dev)
    scores = torch.where(flat_obs > 0, scores, torch.full_like(scores, 2.0))
    idx = scores.topk(k, dim=1, largest=False, sorted=True).indices
    rank = torch.arange(k, device=dev).expand(b, k)
    add = (rank < need[:, None]).to(observed.dtype)
    flat = kept.reshape(b, -1).clone()
    flat.scatter_reduce_(1, idx, add, reduce="amax")
    return flat.view_as(observed)


def ambient_stats(observed: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """Batch-mean observed/kept fractions and the dropped fraction of A (device tensors)."""
    obs_frac = observed.float().mean()
    kept_frac = kept.float().mean()
    dropped = torch.where(obs_frac > 0, (obs_frac - kept_frac) / obs_frac.clamp_min(1e-12),
                          torch.zeros_like(obs_frac))
    return {"ambient_observed_fraction": obs_frac, "ambient_kept_fraction": kept_frac,
            "ambient_dropped_fraction": dropped}
