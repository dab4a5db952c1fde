"""NFDS calibration-set selection (archquant.core.calibration_sampling), checked against
independent oracles: numpy z-scores, torch cosine similarity, brute-force fair allocation,
planted outliers, well-separated blobs, and the hypergeometric miss rate of uniform sampling."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from archquant.core.calibration_sampling import (
    NFDSConfig, allocate_budget, cluster_labels, diverse_sample, frame_similarity_features,
    noise_filter, noise_scores, random_sample, select_calibration,
)


# ----------------------------------------------------------------------------- helpers

def _stats(n: int, layers: int = 4, outliers=(), seed: int = 0) -> torch.Tensor:
    """(n, layers, 2) per-sample mean/variance; ``outliers`` get a huge mean and variance at
    layer 2 only. Normal samples are uniform (bounded): a Gaussian pool has its own tail, which
    the data-adaptive IQR rule would legitimately flag too."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.2 * torch.rand(n, layers, generator=g) - 0.1
    var = 1.0 + 0.1 * torch.rand(n, layers, generator=g)
    stats = torch.stack([mean, var], dim=-1)
    for i in outliers:
        stats[i, 2] = torch.tensor([50.0, 500.0])
    return stats


def _frames_from_angles(angles: torch.Tensor, dim: int = 4, seed: int = 0) -> torch.Tensor:
    """(n, F, dim) frame features whose cosine to frame 0 is cos(angles[:, j-1]) exactly: frame 0 is
    e0, frame j is cos*e0 + sin*e1, each frame scaled by a random positive factor."""
    n, fm1 = angles.shape
    out = torch.zeros(n, fm1 + 1, dim, dtype=torch.float64)
    out[:, 0, 0] = 1.0
    out[:, 1:, 0] = torch.cos(angles)
    out[:, 1:, 1] = torch.sin(angles)
    g = torch.Generator().manual_seed(seed)
    return out * (0.5 + 3 * torch.rand(n, fm1 + 1, 1, generator=g, dtype=torch.float64))


def _blob_angles(sizes, centres, f_minus_1: int = 2, jitter: float = 0.01, seed: int = 0):
    """Angles (n, F-1) forming one tight blob per (size, centre); returns angles and blob ids."""
    g = torch.Generator().manual_seed(seed)
    parts, ids = [], []
    for b, (size, centre) in enumerate(zip(sizes, centres)):
        parts.append(torch.tensor(centre, dtype=torch.float64) + jitter * torch.randn(size, f_minus_1, generator=g, dtype=torch.float64))
        ids += [b] * size
    return torch.cat(parts), np.array(ids)


def _blobs(sizes, seed: int = 0):
    """2-D points in well-separated blobs (centres 100 apart, std 1); returns points and blob ids."""
    rng = np.random.default_rng(seed)
    pts = [rng.normal(size=(s, 2)) + np.array([100.0 * b, -50.0 * b]) for b, s in enumerate(sizes)]
    ids = np.concatenate([[b] * s for b, s in enumerate(sizes)])
    return torch.from_numpy(np.concatenate(pts)), ids


# ----------------------------------------------------------------------------- noise scores / filter

def test_noise_scores_match_hand_numpy():
    stats = _stats(30, layers=3, outliers=(4,))
    stats[:, 1, 0] = 2.5                                     # a constant column: contributes 0, no NaN
    x = stats.numpy().reshape(30, -1).astype(np.float64)
    expected = np.zeros(30)
    for i in range(30):
        total = 0.0
        for j in range(x.shape[1]):
            col = x[:, j]
            sd = math.sqrt(sum((v - col.mean()) ** 2 for v in col) / len(col))
            total += 0.0 if sd == 0 else ((x[i, j] - col.mean()) / sd) ** 2
        expected[i] = math.sqrt(total)
    got = noise_scores(stats)
    assert got.shape == (30,) and torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)


def test_noise_scores_are_invariant_to_per_column_affine_rescaling():
    stats = _stats(25).double()
    scaled = stats * torch.tensor([3.0, 0.01], dtype=torch.float64) + torch.tensor([7.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(noise_scores(scaled), noise_scores(stats), rtol=1e-9, atol=1e-9)


OUTLIERS = (7, 23, 41)


def test_planted_outliers_removed_by_top_fraction():
    scores = noise_scores(_stats(50, outliers=OUTLIERS))
    keep = noise_filter(scores, drop_fraction=len(OUTLIERS) / 50)
    assert keep.dtype == torch.bool
    assert sorted(torch.nonzero(~keep).flatten().tolist()) == list(OUTLIERS)


@pytest.mark.parametrize("seed", range(4))
def test_planted_outliers_removed_by_iqr_rule(seed):
    scores = noise_scores(_stats(50, outliers=OUTLIERS, seed=seed))
    keep = noise_filter(scores, iqr=1.5)
    assert sorted(torch.nonzero(~keep).flatten().tolist()) == list(OUTLIERS)


def test_iqr_rule_matches_tukey_fences_by_hand():
    s = torch.tensor([1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 30.0, -20.0])
    q1, q3 = np.percentile(s.numpy(), [25, 75])
    hi = q3 + 1.5 * (q3 - q1)
    expected = [v <= hi for v in s.tolist()]
    assert noise_filter(s, iqr=1.5).tolist() == expected
    assert expected.count(False) == 1                       # 30 flagged; -20 (far below) is not noise
    assert noise_filter(s, iqr=1.5)[-1]
    assert noise_filter(torch.ones(10), iqr=1.5).all()      # a clean (flat) pool loses nothing


def test_top_fraction_count_and_ties():
    assert (~noise_filter(torch.arange(10.0), drop_fraction=0.2)).tolist() == [False] * 8 + [True] * 2
    assert noise_filter(torch.arange(10.0), drop_fraction=0.0).all()
    # ties at the top: earlier sample dropped first, deterministic
    assert noise_filter(torch.tensor([5.0, 1.0, 5.0, 5.0]), drop_fraction=0.5).tolist() == [False, True, False, True]


# ----------------------------------------------------------------------------- frame features

def test_frame_features_match_cosine_by_hand_and_are_scale_invariant():
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))
    c = frame_similarity_features(x)
    assert c.shape == (6, 4)
    for j in range(1, 5):
        torch.testing.assert_close(c[:, j - 1].float(), F.cosine_similarity(x[:, 0], x[:, j], dim=-1),
                                   rtol=1e-5, atol=1e-6)
    y = x.clone()
    y[:, 0] *= 0.1
    y[:, 3] *= 7.5
    torch.testing.assert_close(frame_similarity_features(y), c)


# ----------------------------------------------------------------------------- allocation / diversity

def _leximin_oracle(sizes, budget):
    """Brute force: among all allocations with sum = budget and q_i <= size_i, the one whose
    ascending-sorted vector is lexicographically largest (max-min fairness)."""
    best = None
    for q in itertools.product(*[range(s + 1) for s in sizes]):
        if sum(q) == budget:
            key = sorted(q)
            best = key if best is None or key > best else best
    return best


@pytest.mark.parametrize("sizes,budget", [([5, 20, 200], 24), ([1, 1, 9], 6), ([3, 3, 3, 3], 7),
                                          ([2, 7, 4, 1], 11), ([6], 4), ([4, 4, 0, 9], 13)])
def test_allocation_is_max_min_fair(sizes, budget):
    q = allocate_budget(sizes, budget)
    assert sum(q) == budget and all(0 <= a <= s for a, s in zip(q, sizes))
    assert sorted(q) == _leximin_oracle([min(s, budget) for s in sizes], budget)


def test_allocation_examples():
    assert allocate_budget([200, 20, 5], 24) == [10, 9, 5]
    assert allocate_budget([200, 20, 5], 40) == [18, 17, 5]
    with pytest.raises(ValueError, match="budget 30 exceeds the 25 available"):
        allocate_budget([20, 5], 30)


def test_diverse_sample_covers_every_blob_evenly_and_random_misses_small_ones():
    sizes, budget = (200, 20, 5), 24
    pts, ids = _blobs(sizes)
    for seed in range(5):
        sel = diverse_sample(pts, budget, num_clusters=3, seed=seed)
        assert len(sel) == len(set(sel)) == budget
        counts = np.bincount(ids[sel], minlength=3).tolist()
        assert counts == [10, 9, 5]                           # blob of 5 gives all 5; rest spread evenly
    # Uniform sampling of the same pool with the same budget: P(blob of 5 entirely missed) is
    # hypergeometric C(220, 24) / C(225, 24) ~ 0.56, and the expected count in it is 24*5/225 ~ 0.53.
    n = sum(sizes)
    p_miss = math.comb(n - 5, budget) / math.comb(n, budget)
    assert p_miss > 0.5
    trials = 300
    misses = sum(np.bincount(ids[random_sample(n, budget, seed=s)], minlength=3)[2] == 0 for s in range(trials))
    assert abs(misses / trials - p_miss) < 0.1
    assert np.bincount(ids[random_sample(n, budget, seed=0)], minlength=3)[2] < 5


def test_cluster_labels_recover_blobs_and_clamp_k():
    pts, ids = _blobs((30, 10, 4))
    lab = cluster_labels(pts, 3).numpy()
    for b in range(3):                                        # each blob is exactly one cluster
        assert len(set(lab[ids == b])) == 1
    assert len(set(lab)) == 3
    assert len(set(cluster_labels(pts[:2], 8).tolist())) == 2  # K clamped to the 2 points


def test_random_sample_is_uniform_unique_and_seeded():
    a = random_sample(100, 10, seed=3)
    assert a == random_sample(100, 10, seed=3) != random_sample(100, 10, seed=4)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)


# ----------------------------------------------------------------------------- full pipeline

def _pool():
    """60 candidates: frame-feature blobs of 40, 12 and 4 samples (original order shuffled);
    4 planted noise samples sitting inside the small blob's region of feature space."""
    angles, blob = _blob_angles((40, 12, 8), centres=((0.1, 0.2), (1.0, 1.4), (2.2, 0.7)))
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(5))
    angles, blob = angles[perm], blob[perm.numpy()]
    noisy = [int(i) for i in np.flatnonzero(blob == 2)[:4]]   # half of the 8 in blob 2 are noise
    return _stats(60, outliers=noisy), _frames_from_angles(angles), blob, noisy


def test_select_calibration_filters_then_spreads_over_clusters():
    stats, frames, blob, noisy = _pool()
    cfg = NFDSConfig.paper(drop_fraction=4 / 60, num_clusters=3, num_samples=12)
    res = select_calibration(stats, frames, cfg, seed=0)
    assert sorted(torch.nonzero(~res.keep).flatten().tolist()) == sorted(noisy)
    assert res.num_filtered == 4 and res.flagged.tolist() == (~res.keep).tolist()
    assert len(res.indices) == len(set(res.indices)) == 12
    assert not set(res.indices) & set(noisy)
    assert all(res.keep[i] for i in res.indices)
    assert (res.labels[~res.keep] == -1).all() and (res.labels[res.keep] >= 0).all()
    # kept: blobs of 40, 12, 4 -> 4 + 4 + 4, checked on the ORIGINAL pool's blob ids
    assert np.bincount(blob[res.indices], minlength=3).tolist() == [4, 4, 4]
    assert sorted(res.cluster_sizes().values()) == [4, 12, 40]
    assert sorted(res.selected_per_cluster().values()) == [4, 4, 4] and res.num_clusters == 3


def test_apply_filter_false_flags_but_keeps_everything():
    stats, frames, blob, noisy = _pool()
    cfg = NFDSConfig.paper(drop_fraction=4 / 60, num_clusters=3, num_samples=12, apply_filter=False)
    res = select_calibration(stats, frames, cfg, seed=0)
    assert res.keep.all() and res.num_filtered == 0
    assert sorted(torch.nonzero(res.flagged).flatten().tolist()) == sorted(noisy)
    assert sorted(res.cluster_sizes().values()) == [8, 12, 40]


def test_reference_preset_iqr_filter_and_four_per_cluster():
    cfg = NFDSConfig.reference()
    assert (cfg.iqr_factor, cfg.drop_fraction, cfg.num_clusters, cfg.n_init, cfg.num_samples) == (1.5, None, 5, 50, 20)
    centres = [(0.1, 0.1), (0.9, 0.2), (0.2, 1.1), (1.3, 1.3), (2.4, 0.4)]
    angles, blob = _blob_angles((30, 12, 9, 6, 5), centres)
    noisy = [3, 40, 55]
    res = select_calibration(_stats(62, outliers=noisy), _frames_from_angles(angles), cfg, seed=1)
    assert sorted(torch.nonzero(~res.keep).flatten().tolist()) == noisy
    assert not set(res.indices) & set(noisy)
    assert np.bincount(blob[res.indices], minlength=5).tolist() == [4, 4, 4, 4, 4]


def test_paper_preset_defaults_and_determinism():
    cfg = NFDSConfig.paper()
    assert (cfg.drop_fraction, cfg.iqr_factor, cfg.num_clusters, cfg.num_samples, cfg.apply_filter) == (0.2, None, 8, 40, True)
    g = torch.Generator().manual_seed(0)
    stats, frames = _stats(150, seed=2), torch.randn(150, 4, 16, generator=g)
    a = select_calibration(stats, frames, cfg, seed=0)
    b = select_calibration(stats, frames, cfg, seed=0)
    c = select_calibration(stats, frames, cfg, seed=1)
    assert a.indices == b.indices and a.indices != c.indices
    assert a.num_filtered == 30 and len(a.indices) == len(set(a.indices)) == 40
    assert all(0 <= i < 150 and a.keep[i] for i in a.indices + c.indices)
    torch.testing.assert_close(a.labels, c.labels)           # the partition does not depend on the seed


# ----------------------------------------------------------------------------- errors

def test_error_messages():
    stats, frames = _stats(10), torch.randn(10, 3, 4)
    with pytest.raises(ValueError, match=r"num_samples=9 exceeds the 8 samples left after noise filtering"):
        select_calibration(stats, frames, NFDSConfig.paper(num_samples=9), seed=0)
    with pytest.raises(ValueError, match=r"at least 2 frames per sample, got F=1"):
        frame_similarity_features(torch.randn(10, 1, 4))
    with pytest.raises(ValueError, match=r"frame_features must have shape \(N, F, D\), got \(10, 3\)"):
        frame_similarity_features(torch.randn(10, 3))
    with pytest.raises(ValueError, match=r"stats \(10, 4, 2\) and frame features \(9, 3, 4\) disagree"):
        select_calibration(stats, torch.randn(9, 3, 4))
    with pytest.raises(ValueError, match=r"stats must have shape \(N, L, 2\).*got \(10, 4, 3\)"):
        noise_scores(torch.randn(10, 4, 3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        noise_scores(torch.full((3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="exactly one of drop_fraction= or iqr="):
        noise_filter(torch.rand(5), drop_fraction=0.2, iqr=1.5)
    with pytest.raises(ValueError, match="exactly one of drop_fraction= or iqr="):
        noise_filter(torch.rand(5))
    with pytest.raises(ValueError, match=r"drop_fraction must be in \[0, 1\)"):
        noise_filter(torch.rand(5), drop_fraction=1.0)
    with pytest.raises(ValueError, match="exactly one of drop_fraction or iqr_factor"):
        NFDSConfig(drop_fraction=0.2, iqr_factor=1.5)
    with pytest.raises(ValueError, match=r"num_samples=11 exceeds the 10 candidates"):
        random_sample(10, 11)


def test_similarities_given_directly_select_the_same_samples():
    gen = torch.Generator().manual_seed(3)
    stats = torch.randn(30, 4, 2, generator=gen)
    frames = torch.randn(30, 4, 16, generator=gen)
    config = NFDSConfig.paper(num_samples=8, num_clusters=3)
    direct = select_calibration(stats, frames, config, seed=1)
    given = select_calibration(stats, None, config, seed=1, similarities=frame_similarity_features(frames))
    assert given.indices == direct.indices and torch.equal(given.flagged, direct.flagged)
    with pytest.raises(ValueError, match="exactly one of frame_features or similarities"):
        select_calibration(stats, frames, config, similarities=frame_similarity_features(frames))
