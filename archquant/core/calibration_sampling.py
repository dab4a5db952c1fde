"""Calibration-set selection: noise-filtered diverse sampling (NFDS, QuantVGGT, arXiv 2509.21302).

Which samples a post-training quantizer calibrates on decides its activation ranges. A few
"noisy" samples (degenerate inputs whose deep activations sit far from the rest) stretch those
ranges, and a uniform random draw over-represents the dominant mode of the pool while missing
rare but legitimate ones. NFDS fixes both, in two stages:

1. *Noise filter*: every candidate gets a score, the L2 norm of its z-scored deep-layer activation
   statistics (per layer mean and variance); the highest-scoring samples are dropped.
2. *Diverse sampling*: the survivors are described by frame-aware features (cosine similarity of
   frame 0 to each later frame), clustered with K-Means, and the budget is spread as evenly as
   possible over the clusters, members being drawn at random within each cluster.

Family-agnostic by design: the adapter computes the tensors (``stats`` of shape (N, L, 2),
``frame_features`` of shape (N, F, D)); this module only returns indices into the candidate pool.

Two presets: ``NFDSConfig.paper()`` (drop the top 20 % of scores, K = 8, 40 samples) and
``NFDSConfig.reference()`` (the released code: 1.5*IQR outlier rule, K = 5, n_init = 50,
4 per cluster -> 20 samples). The released code computes its filter and never applies it;
``apply_filter=False`` reproduces that, the default applies it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "noise_scores", "noise_filter", "frame_similarity_features", "allocate_budget",
    "cluster_labels", "diverse_sample", "random_sample", "NFDSConfig", "NFDSResult",
    "select_calibration",
]


# ----------------------------------------------------------------------------- noise filter

def noise_scores(stats: torch.Tensor) -> torch.Tensor:
    """Noise score per candidate: the L2 norm of its z-scored deep-layer statistics.

    ``stats`` has shape (N, L, 2): per sample and deep layer, the activation mean and variance
    (or std). Each of the 2L columns is z-scored across the N samples, so that layers with large
    raw magnitudes do not dominate and a sample scores high only by being atypical *relative to
    the pool*. A constant column (std 0) carries no information and contributes 0 (not NaN).
    Population std (ddof 0) is used. Returns a float64 tensor of shape (N,).
    """
    if not isinstance(stats, torch.Tensor):
        stats = torch.as_tensor(stats)
    if stats.ndim != 3 or stats.shape[-1] != 2 or stats.shape[0] < 1:
        raise ValueError(f"stats must have shape (N, L, 2) with N >= 1, got {tuple(stats.shape)}")
    if not torch.isfinite(stats).all():
        raise ValueError("stats contains NaN or Inf values")
    cols = stats.reshape(stats.shape[0], -1).to(torch.float64)
    mean = cols.mean(dim=0, keepdim=True)
    std = cols.std(dim=0, unbiased=False, keepdim=True)
    z = (cols - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.linalg.vector_norm(z, dim=1)


def noise_filter(scores: torch.Tensor, *, drop_fraction: Optional[float] = None,
                 iqr: Optional[float] = None) -> torch.Tensor:
    """Boolean keep-mask over the candidates; exactly one rule must be given.

    * ``drop_fraction=p`` (paper): drop the ``floor(p * N)`` highest scores. A fixed fraction
      makes the calibration budget predictable whatever the pool looks like. Ties are broken by
      position (the earlier sample is dropped first) so the mask is deterministic.
    * ``iqr=k`` (reference code): the Tukey rule's upper fence, flag scores above
      ``Q3 + k*IQR`` (quartiles with linear interpolation, as ``numpy.percentile``). It adapts to
      the pool: a clean pool loses nothing. Only the upper fence: a score far *below* the rest
      means the sample sits at the centre of the pool's statistics, the opposite of noise.
    """
    if (drop_fraction is None) == (iqr is None):
        raise ValueError("noise_filter needs exactly one of drop_fraction= or iqr=")
    scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape (N,), got {tuple(scores.shape)}")
    n = scores.shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    if drop_fraction is not None:
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1), got {drop_fraction}")
        n_drop = math.floor(drop_fraction * n + 1e-9)
        order = torch.argsort(-scores.to(torch.float64), stable=True)
        keep[order[:n_drop]] = False
        return keep
    if iqr < 0:
        raise ValueError(f"iqr factor must be >= 0, got {iqr}")
    s = scores.detach().to(torch.float64).cpu().numpy()
    q1, q3 = np.percentile(s, [25.0, 75.0])
    return torch.from_numpy(s <= q3 + iqr * (q3 - q1))


# ----------------------------------------------------------------------------- features

def frame_similarity_features(frame_features: torch.Tensor) -> torch.Tensor:
    """Frame-aware descriptor per sample: cosine similarity of frame 0 to each later frame.

    ``frame_features`` has shape (N, F, D), one pooled feature vector per frame. The result,
    shape (N, F-1), describes how the views of a multi-frame sample relate to the reference
    frame (overlap, baseline), which is what distinguishes calibration scenes for a
    multi-view model; cosine makes it invariant to each frame's feature scale.
    """
    if not isinstance(frame_features, torch.Tensor):
        frame_features = torch.as_tensor(frame_features)
    if frame_features.ndim != 3:
        raise ValueError(f"frame_features must have shape (N, F, D), got {tuple(frame_features.shape)}")
    if frame_features.shape[1] < 2:
        raise ValueError(f"frame_features needs at least 2 frames per sample, got F={frame_features.shape[1]}")
    x = frame_features.to(torch.float64)
    return F.cosine_similarity(x[:, :1, :], x[:, 1:, :], dim=-1)


# ----------------------------------------------------------------------------- diverse sampling

def allocate_budget(sizes: list[int], budget: int) -> list[int]:
    """Split ``budget`` over clusters of the given ``sizes`` as evenly as possible (max-min fair).

    Clusters are served smallest first, each taking ``min(size, remaining // clusters_left)``:
    a cluster smaller than its share gives all it has and the surplus flows to the larger ones,
    and unsaturated clusters end up within one sample of each other (the +1s land on the larger
    clusters). Requires ``budget <= sum(sizes)``.
    """
    if budget > sum(sizes):
        raise ValueError(f"budget {budget} exceeds the {sum(sizes)} available samples")
    quota = [0] * len(sizes)
    remaining = budget
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    for left, i in zip(range(len(order), 0, -1), order):
        quota[i] = min(sizes[i], remaining // left)
        remaining -= quota[i]
    assert remaining == 0
    return quota


def cluster_labels(features: torch.Tensor, num_clusters: int, *, n_init: int = 10,
                   random_state: int = 0) -> torch.Tensor:
    """K-Means labels (scikit-learn) for the rows of ``features``, shape (n,), int64.

    ``num_clusters`` is clamped to the number of rows: K-Means cannot make more clusters than
    points, and a small surviving pool should still be sampled rather than rejected.
    ``random_state`` is fixed (independent of the sampling seed) so that the partition of the
    pool is a property of the data, and only the draw within clusters varies with the seed.
    """
    from sklearn.cluster import KMeans

    feats = torch.as_tensor(features).detach().to(torch.float64).cpu().numpy()
    if feats.ndim != 2 or feats.shape[0] < 1:
        raise ValueError(f"features must have shape (n, d) with n >= 1, got {feats.shape}")
    k = max(1, min(int(num_clusters), feats.shape[0]))
    km = KMeans(n_clusters=k, n_init=n_init, random_state=random_state)
    return torch.from_numpy(km.fit_predict(feats).astype(np.int64))


def _sample_within(labels: torch.Tensor, num_samples: int, seed: int) -> list[int]:
    """Draw the per-cluster quotas uniformly at random within each cluster; sorted row indices."""
    lab = labels.cpu().numpy()
    clusters = np.unique(lab)
    members = [np.flatnonzero(lab == c) for c in clusters]
    quotas = allocate_budget([len(m) for m in members], num_samples)
    rng = np.random.default_rng(seed)
    picked = [rng.choice(m, size=q, replace=False) for m, q in zip(members, quotas) if q]
    return sorted(int(i) for i in np.concatenate(picked)) if picked else []


def diverse_sample(features: torch.Tensor, num_samples: int, num_clusters: int = 8, seed: int = 0,
                   n_init: int = 10, random_state: int = 0) -> list[int]:
    """Select ``num_samples`` rows of ``features`` (n, d) spread evenly over K-Means clusters.

    Even spreading over clusters, rather than proportional to their size, is the point: rare
    modes of the pool get represented in the calibration set. Returns sorted unique row indices.
    """
    n = torch.as_tensor(features).shape[0]
    _check_budget(num_samples, n, "rows in features")
    labels = cluster_labels(features, num_clusters, n_init=n_init, random_state=random_state)
    return _sample_within(labels, num_samples, seed)


def random_sample(n: int, num_samples: int, seed: int = 0) -> list[int]:
    """Uniform random baseline: ``num_samples`` distinct indices out of ``range(n)``, sorted."""
    _check_budget(num_samples, n, "candidates")
    return sorted(int(i) for i in np.random.default_rng(seed).choice(n, size=num_samples, replace=False))


def _check_budget(num_samples: int, available: int, what: str) -> None:
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > available:
        raise ValueError(f"num_samples={num_samples} exceeds the {available} {what}")


# ----------------------------------------------------------------------------- pipeline

@dataclass
class NFDSConfig:
    """NFDS settings. Exactly one of ``drop_fraction`` / ``iqr_factor`` selects the noise rule;
    ``apply_filter=False`` computes the flags but keeps every sample (the reference code's
    behaviour)."""

    drop_fraction: Optional[float] = 0.2
    iqr_factor: Optional[float] = None
    apply_filter: bool = True
    num_clusters: int = 8
    num_samples: int = 40
    n_init: int = 10
    kmeans_random_state: int = 0

    def __post_init__(self) -> None:
        if (self.drop_fraction is None) == (self.iqr_factor is None):
            raise ValueError("NFDSConfig needs exactly one of drop_fraction or iqr_factor")

    @classmethod
    def paper(cls, **overrides) -> "NFDSConfig":
        """The paper's setting: drop the 20 % noisiest, K = 8, 40 calibration samples."""
        return cls(**{"drop_fraction": 0.2, "iqr_factor": None, "num_clusters": 8,
                      "num_samples": 40, "n_init": 10, **overrides})

    @classmethod
    def reference(cls, **overrides) -> "NFDSConfig":
        """The released code's setting: 1.5*IQR outliers, K = 5, n_init = 50, 4 per cluster."""
        return cls(**{"drop_fraction": None, "iqr_factor": 1.5, "num_clusters": 5,
                      "num_samples": 20, "n_init": 50, **overrides})


@dataclass
class NFDSResult:
    """Outcome of ``select_calibration``, all indexed by the ORIGINAL candidate pool.

    ``indices``: selected samples (sorted, unique). ``flagged``: the noise rule's verdict (True =
    noisy). ``keep``: samples that entered clustering (``~flagged`` unless the filter is off).
    ``scores``: noise scores. ``labels``: K-Means cluster per sample, -1 for filtered ones.
    """

    indices: list[int]
    keep: torch.Tensor
    flagged: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    num_clusters: int = field(default=0)

    @property
    def num_filtered(self) -> int:
        return int((~self.keep).sum())

    def cluster_sizes(self) -> dict[int, int]:
        """Kept samples per cluster."""
        lab = self.labels[self.labels >= 0]
        return {int(c): int((lab == c).sum()) for c in torch.unique(lab)}

    def selected_per_cluster(self) -> dict[int, int]:
        """Selected samples per cluster: how the calibration set spreads over the modes."""
        lab = self.labels[torch.as_tensor(self.indices, dtype=torch.long)]
        return {c: int((lab == c).sum()) for c in self.cluster_sizes()}


def select_calibration(stats: torch.Tensor, frame_features: torch.Tensor | None,
                       config: Optional[NFDSConfig] = None, seed: int = 0, *,
                       similarities: torch.Tensor | None = None) -> NFDSResult:
    """Run NFDS over a candidate pool and return indices into it (see module docstring).

    ``stats`` (N, L, 2) feeds the noise filter, ``frame_features`` (N, F, D) the diversity stage;
    both describe the same N candidates. ``similarities`` (N, F-1), the output of
    ``frame_similarity_features``, may be given instead of ``frame_features`` (a caller that
    computes it sample by sample need not hold every frame's features at once).
    """
    if (frame_features is None) == (similarities is None):
        raise ValueError("select_calibration needs exactly one of frame_features or similarities")
    config = config or NFDSConfig.paper()
    stats = torch.as_tensor(stats)
    described = torch.as_tensor(frame_features if similarities is None else similarities)
    if stats.ndim >= 1 and described.ndim >= 1 and stats.shape[0] != described.shape[0]:
        raise ValueError(f"stats {tuple(stats.shape)} and frame features {tuple(described.shape)} "
                         f"disagree on the number of samples N")
    scores = noise_scores(stats)
    feats = frame_similarity_features(described) if similarities is None else described.to(torch.float64)
    flagged = ~noise_filter(scores, drop_fraction=config.drop_fraction, iqr=config.iqr_factor)
    keep = ~flagged if config.apply_filter else torch.ones_like(flagged)
    kept_idx = torch.nonzero(keep).flatten()
    _check_budget(config.num_samples, kept_idx.numel(), "samples left after noise filtering")
    kept_labels = cluster_labels(feats[kept_idx], config.num_clusters, n_init=config.n_init,
                                 random_state=config.kmeans_random_state)
    rows = _sample_within(kept_labels, config.num_samples, seed)
    labels = torch.full((stats.shape[0],), -1, dtype=torch.long)
    labels[kept_idx] = kept_labels
    return NFDSResult(indices=[int(kept_idx[r]) for r in rows], keep=keep, flagged=flagged,
                      scores=scores, labels=labels, num_clusters=int(torch.unique(kept_labels).numel()))
