"""The FP inputs of a model's repeated blocks, for block-wise calibration.

Learnable clipping and block reconstruction (OmniQuant, BRECQ, ...) tune one block at a time
against its FP behaviour: they need what each block received during a normal forward pass, so
that ``block(*call.args, **call.kwargs)`` can be run on its own, again and again. Forward pre-hooks
(with keyword arguments) on the blocks of ``ModelStructure.blocks`` record exactly that, whatever
the block's signature (Mamba: ``layer(h)``; a DiT block: ``block(x, c)``; extra keyword arguments).

A block that runs several times per batch (a diffusion sampler calls every block at every
timestep) contributes one ``BlockCall`` per run, in execution order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from .calibration import ForwardFn, run_batches


@dataclass
class BlockCall:
    """One call of a block: its positional and keyword arguments, tensors detached and copied."""

    args: tuple
    kwargs: dict

    def run(self, block: nn.Module) -> Any:
        return block(*self.args, **self.kwargs)


def _copy(value: Any, device: torch.device | str | None) -> Any:
    """A detached copy of every tensor in ``value`` (the model may later change its inputs in place)."""
    if torch.is_tensor(value):
        value = value.detach()
        return value.to(device, copy=True) if device is not None else value.clone()
    if isinstance(value, tuple):
        return tuple(_copy(v, device) for v in value)
    if isinstance(value, list):
        return [_copy(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v, device) for k, v in value.items()}
    return value


def _blocks(model: nn.Module, blocks: Iterable[str]) -> dict[str, nn.Module]:
    blocks = list(blocks)
    if not blocks:
        raise ValueError("no blocks given: the model's structure declares none (ModelStructure.blocks)")
    modules = dict(model.named_modules())
    for name in blocks:
        if name not in modules:
            raise ValueError(f"block {name!r} is not a module of {type(model).__name__}")
    return {name: modules[name] for name in blocks}


def capture_block_inputs(model: nn.Module, batches: Iterable[Any], blocks: Iterable[str],
                         forward_fn: ForwardFn | None = None, *, device: torch.device | str | None = None,
                         progress: bool = False) -> dict[str, list[BlockCall]]:
    """block name → its calls over ``batches``, from one pass of ``model`` as it is now.

    Every block's inputs are held at once: ``device="cpu"`` keeps them off the accelerator.
    A block that never runs is a ``ValueError`` (most often a wrong name in the structure).
    """
    modules = _blocks(model, blocks)
    calls: dict[str, list[BlockCall]] = {name: [] for name in modules}

    def hook_for(name: str):
        def hook(_module, args, kwargs):
            calls[name].append(BlockCall(_copy(args, device), _copy(kwargs, device)))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n), with_kwargs=True) for n, m in modules.items()]
    try:
        run_batches(model, batches, forward_fn, desc="block inputs", progress=progress)
    finally:
        for h in handles:
            h.remove()
    idle = [n for n, c in calls.items() if not c]
    if idle:
        raise ValueError(f"block {idle[0]!r} never ran during the forward pass")
    return calls


def block_inputs(model: nn.Module, batches: Iterable[Any], blocks: Iterable[str],
                 forward_fn: ForwardFn | None = None, *, sequential: bool = False,
                 device: torch.device | str | None = None,
                 progress: bool = False) -> Iterator[tuple[str, nn.Module, list[BlockCall]]]:
    """(name, block, calls) for each block in order, for a loop that calibrates one block at a time.

    ``sequential=False``: the FP inputs of every block, from one pass made before the first
    block is yielded (changes the caller makes to a block do not reach the later blocks'
    inputs); each block's calls are released once the loop moves on.
    ``sequential=True``: block i's inputs come from a pass made when its turn comes, so they
    follow whatever the caller did to blocks 0..i-1 (GPTQ-style sequential calibration); one
    block's inputs in memory at a time, one pass over ``batches`` per block.
    """
    modules = _blocks(model, blocks)
    batches = list(batches)  # iterated once per block when sequential
    if sequential:
        for name, block in modules.items():
            yield name, block, capture_block_inputs(model, batches, [name], forward_fn, device=device,
                                                    progress=progress)[name]
        return
    captured = capture_block_inputs(model, batches, list(modules), forward_fn, device=device, progress=progress)
    for name, block in modules.items():
        yield name, block, captured.pop(name)
