"""The runner's place in a ``torchrun`` job: rank, world size, and the few collectives it needs.

``torchrun --nproc_per_node N -m archquant.run CONFIG`` starts N copies of the runner with
``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` set. ``Ranks.from_env`` joins them in a process group
(gloo for CPU work, NCCL when CUDA is there), with a timeout, so that no rank waits for a dead one
forever. One process (no ``WORLD_SIZE``, or 1) is rank 0 of 1 and every collective is a no-op.

What the runner does with it (``run.py``): rank 0 calibrates and quantizes, and the others rebuild
the same quantized model from what it sends (``broadcast_from_main``); the evaluation batches are
split into contiguous shards, one per rank, and every rank's per-item results come back in rank
order (``all_ranks``), so merged in item order as in one process. A failure on any rank is raised,
with that rank's one-line message, on every rank (``RankFailed``), and the job stops everywhere.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

#: seconds a rank waits in a collective before it gives up (rank 0 may calibrate a large model in
#: the meantime): ARCHQUANT_DIST_TIMEOUT overrides it
DEFAULT_TIMEOUT_S = 1800


class RankFailed(RuntimeError):
    """Another rank (or this one) failed; ``exit_code`` is what that rank's failure exits with."""

    def __init__(self, rank: int, message: str, exit_code: int):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.exit_code = rank, exit_code


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """This process's rank in a torchrun job (the process group is started here), or rank 0 of 1."""
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world <= 1:
            return cls()
        import torch.distributed as dist

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = datetime.timedelta(seconds=float(os.environ.get("ARCHQUANT_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)))
        dist.init_process_group(backend=backend, timeout=timeout)
        return cls(dist.get_rank(), dist.get_world_size(), backend)

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                # every rank reaches the teardown before any tears down: a gloo group destroyed while
                # a peer is still on its way out aborts the process now and then (SIGABRT, "terminate
                # called without an active exception"), which hid the rank's own exit code
                try:
                    dist.barrier()
                except Exception:  # noqa: BLE001 - a peer already gone: nothing left to wait for
                    pass
                dist.destroy_process_group()

    def shard(self, n: int) -> range:
        """This rank's contiguous block of ``n`` items (the first ranks take one more when n does
        not divide evenly), so that blocks in rank order are the items in order."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def all_ranks(self, fn: Callable[[], Any], classify: Callable[[BaseException], tuple[str, int]]) -> list:
        """``fn()`` on every rank; every rank gets the list of results in rank order. If ``fn``
        raised on any rank, every rank raises ``RankFailed`` with the first failing rank's message
        (``classify(error) -> (one line, exit code)``); the failing rank re-raises its own error."""
        outcome, error = _attempt(fn, classify)
        if not self.distributed:
            if error is not None:
                raise error
            return [outcome[1]]
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, outcome)
        _raise_first_failure(gathered, self.rank, error)
        return [value for _, value in gathered]

    def broadcast_from_main(self, fn: Callable[[], Any], classify: Callable[[BaseException], tuple[str, int]]) -> Any:
        """``fn()`` on rank 0 only; every rank gets its result (or raises its failure)."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist

        outcome, error = _attempt(fn, classify) if self.is_main else (None, None)
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        _raise_first_failure(box, self.rank, error, ranks=[0])
        return box[0][1]


def _attempt(fn, classify):
    """(("ok", value), None) or (("failed", (line, code)), the error)."""
    try:
        return ("ok", fn()), None
    except Exception as e:  # noqa: BLE001 - every failure is reported to the other ranks, then re-raised
        return ("failed", classify(e)), e


def _raise_first_failure(outcomes: list, me: int, own: BaseException | None, ranks: list[int] | None = None) -> None:
    for r, (status, value) in zip(ranks or range(len(outcomes)), outcomes):
        if status == "failed":
            if r == me and own is not None:
                raise own
            line, code = value
            raise RankFailed(r, line, code)
