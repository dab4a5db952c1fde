"""A recipe step that chooses which calibration samples the later steps see.

``SelectCalibration`` runs first in a recipe. From the calibration pool (one sample per batch) it
keeps ``num_samples`` batches and hands only those to the steps after it:

* ``method: nfds`` (QuantVGGT's noise-filtered diverse sampling, ``core.calibration_sampling``):
  one forward pass per candidate records the mean and variance of the inputs of the deepest
  blocks (the last ``deep_blocks`` of ``ModelStructure.blocks``; default the last sixth, as the
  reference code hooks blocks 20-23 of 24) and the frame features the family declares
  (``ModelStructure.frame_features``); the noisiest candidates are dropped (the paper's top-p rule,
  or the reference code's 1.5 IQR fence) and K-Means over frame-0 cosine similarities spreads
  the budget over clusters. ``apply_filter: false`` reproduces the reference code, which flags
  noisy samples and then keeps them;
* ``method: random``: a seeded uniform draw of the same size (the baseline NFDS is compared with).

Which samples were chosen is reported (``notes``); it is not saved with the model, since a reload
needs no calibration data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .calibration import run_batches
from .calibration_sampling import NFDSConfig, frame_similarity_features, random_sample, select_calibration
from .recipe import Context, Step, register_step

METHODS = ("nfds", "random")
NOISE_RULES = ("top_p", "iqr")


class _DeepStatistics:
    """Mean and variance of each hooked block's input, per forward pass."""

    def __init__(self, model: nn.Module, blocks: list[str]) -> None:
        modules = dict(model.named_modules())
        missing = [b for b in blocks if b not in modules]
        if missing:
            raise ValueError(f"block {missing[0]!r} is not a module of {type(model).__name__}")
        self.current: dict[str, tuple[float, float]] = {}
        self.handles = [modules[b].register_forward_pre_hook(self._hook(b)) for b in blocks]
        self.blocks = blocks

    def _hook(self, name: str):
        def hook(_module, args):
            x = args[0].detach().double()
            self.current[name] = (float(x.mean()), float(x.var(unbiased=False)))
        return hook

    def take(self) -> torch.Tensor:
        """(L, 2) of the last pass, in block order; a block that did not run is a ValueError."""
        idle = [b for b in self.blocks if b not in self.current]
        if idle:
            raise ValueError(f"block {idle[0]!r} did not run during the NFDS statistics pass")
        out = torch.tensor([self.current[b] for b in self.blocks], dtype=torch.float64)
        self.current = {}
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@register_step
@dataclass
class SelectCalibration(Step):
    kind: ClassVar[str] = "select_calibration"
    method: str = "nfds"
    num_samples: int = 16
    num_clusters: int = 4
    noise_rule: str = "top_p"
    drop_fraction: float = 0.2
    iqr_factor: float = 1.5
    apply_filter: bool = True
    #: how many of the last blocks feed the noise score (None: the last sixth, at least 1)
    deep_blocks: int | None = None
    n_init: int = 10
    seed: int = 0

    def validate(self, where: str = "select_calibration") -> None:
        if self.method not in METHODS:
            raise ValueError(f"{where}.method={self.method!r} not allowed: allowed {', '.join(map(repr, METHODS))}")
        if self.noise_rule not in NOISE_RULES:
            raise ValueError(f"{where}.noise_rule={self.noise_rule!r} not allowed: allowed "
                             f"{', '.join(map(repr, NOISE_RULES))}")
        for key in ("num_samples", "num_clusters", "n_init"):
            if type(getattr(self, key)) is not int or getattr(self, key) < 1:
                raise ValueError(f"{where}.{key}={getattr(self, key)!r} not allowed: an integer >= 1")
        if self.deep_blocks is not None and (type(self.deep_blocks) is not int or self.deep_blocks < 1):
            raise ValueError(f"{where}.deep_blocks={self.deep_blocks!r} not allowed: an integer >= 1 or null")
        if not 0.0 <= self.drop_fraction < 1.0:
            raise ValueError(f"{where}.drop_fraction={self.drop_fraction} not allowed: in [0, 1)")
        if self.iqr_factor < 0:
            raise ValueError(f"{where}.iqr_factor={self.iqr_factor} not allowed: >= 0")

    def needs_calibration(self) -> bool:
        return True

    def nfds_config(self) -> NFDSConfig:
        top_p = self.noise_rule == "top_p"
        return NFDSConfig(drop_fraction=self.drop_fraction if top_p else None,
                          iqr_factor=None if top_p else self.iqr_factor, apply_filter=self.apply_filter,
                          num_clusters=self.num_clusters, num_samples=self.num_samples, n_init=self.n_init,
                          kmeans_random_state=self.seed)

    def _deep_blocks(self, ctx: Context) -> list[str]:
        blocks = list(ctx.structure.blocks)
        if not blocks:
            raise ValueError("NFDS needs the model's blocks for its noise statistics; this family declares none")
        k = self.deep_blocks or max(1, math.ceil(len(blocks) / 6))
        return blocks[-min(k, len(blocks)):]

    def _describe(self, model: nn.Module, ctx: Context, pool: list) -> tuple[torch.Tensor, torch.Tensor]:
        features = ctx.structure.frame_features
        if features is None:
            raise ValueError("recipe step 'select_calibration' with method nfds needs frame features, which this "
                             "family does not declare (ModelStructure.frame_features): use method random")
        deep = _DeepStatistics(model, self._deep_blocks(ctx))
        stats, sims = [], []
        try:
            def describe(m, batch):
                f = torch.as_tensor(features(m, batch))
                if f.dim() != 2 or f.shape[0] < 2:
                    raise ValueError(f"NFDS needs one sample of at least 2 frames per calibration batch, got frame "
                                     f"features of shape {tuple(f.shape)} (set calibration.batch_size: 1)")
                sims.append(frame_similarity_features(f[None])[0])
                stats.append(deep.take())

            with torch.no_grad():
                run_batches(model, pool, describe, desc="NFDS statistics", progress=ctx.progress)
        finally:
            deep.close()
        return torch.stack(stats), torch.stack(sims)

    def check_calibration(self, num_batches: int) -> None:
        if self.num_samples > num_batches:
            raise ValueError(f"select_calibration.num_samples={self.num_samples} exceeds the calibration pool of "
                             f"{num_batches} samples (calibration.num_samples)")

    def apply(self, model: nn.Module, ctx: Context) -> None:
        pool = ctx.batches(self.kind)
        self.check_calibration(len(pool))
        if self.method == "random":
            chosen = random_sample(len(pool), self.num_samples, self.seed)
            self.selection = {"method": "random", "pool": len(pool), "chosen": chosen}
        else:
            stats, sims = self._describe(model, ctx, pool)
            result = select_calibration(stats, None, self.nfds_config(), seed=self.seed, similarities=sims)
            chosen = result.indices
            self.selection = {"method": "nfds", "pool": len(pool), "chosen": chosen,
                              "flagged": int(result.flagged.sum()), "filtered": result.num_filtered,
                              "clusters": result.cluster_sizes(), "per_cluster": result.selected_per_cluster()}
        ctx.calib_batches = [pool[i] for i in chosen]

    def notes(self) -> list[str]:
        sel = getattr(self, "selection", None)
        if sel is None:
            return []
        if sel["method"] == "random":
            return [f"calibration: {len(sel['chosen'])} of {sel['pool']} pool samples drawn at random "
                    f"(seed {self.seed}): {sel['chosen']}"]
        return [f"calibration (NFDS): {sel['flagged']} of {sel['pool']} pool samples flagged as noisy, "
                f"{sel['filtered']} removed; {len(sel['chosen'])} chosen over clusters of sizes "
                f"{sorted(sel['clusters'].values(), reverse=True)}: {sel['chosen']}"]
