"""What the runner does differently when a ``torchrun`` job spreads it over several processes.

* The evaluation batches are split into contiguous shards (``shard_split``): each rank generates its
  own items for every model, and the per-item results come back in rank order, i.e. in item order.
* Quantization runs once, on rank 0; the others receive the quantized model as the checkpoint bytes
  rank 0 saved (``share_quantized``) and load them with ``load_quantized``, the same path and
  checks as a reload, so every rank holds the same tensors (``state_digest`` proves it).
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .data import DataSplit
from .distributed import Ranks


def shard_split(split: DataSplit, ranks: Ranks) -> DataSplit:
    """This rank's contiguous block of ``split``'s batches (the same batches as in one process, so
    every item is generated exactly as there)."""
    block = ranks.shard(len(split.batches))
    return DataSplit(f"{split.description} (batches {block.start}..{block.stop - 1} of rank {ranks.rank})",
                     split.batches[block.start:block.stop], split.item_ids, extra=split.extra, digests=split.digests)


def checkpoint_files(directory: Path) -> dict[str, bytes]:
    """Every file of a saved checkpoint, by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(directory).iterdir()) if p.is_file()}


def load_checkpoint_files(files: dict[str, bytes]) -> nn.Module:
    """The model a checkpoint's files describe (written to a temporary folder, loaded with every
    check ``load_quantized`` makes)."""
    from .api import load_quantized

    with tempfile.TemporaryDirectory(prefix="archquant-rank-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        return load_quantized(tmp)


def share_quantized(ranks: Ranks, quantize: Callable[[], tuple[nn.Module, Any]],
                    save: Callable[[nn.Module, Path], None], classify) -> tuple[nn.Module | None, Any]:
    """Rank 0 runs ``quantize() -> (model, info)`` and ``save(model, folder)``; every other rank gets
    the saved files and loads them. Returns (this rank's model, rank 0's info; None elsewhere)."""
    held: dict = {}

    def on_main():
        model, info = quantize()
        held["model"] = model
        with tempfile.TemporaryDirectory(prefix="archquant-share-") as tmp:
            save(model, Path(tmp) / "checkpoint")
            return checkpoint_files(Path(tmp) / "checkpoint"), info

    files, info = ranks.broadcast_from_main(on_main, classify)
    if ranks.is_main:
        return held["model"], info
    return load_checkpoint_files(files), None


def state_digest(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
