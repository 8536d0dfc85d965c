"""Activation checkpointing for training: chosen sub-modules keep only their inputs for the backward pass and
run their forward again there, trading one extra forward of those parts for their activation memory.

BatchNorm in train mode updates its running statistics on every forward, so a plain recompute would update
them twice per step; here the recomputation restores them, so a checkpointed step leaves the model exactly as
an ordinary step does.
"""

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_BATCHNORM_STATE = ("running_mean", "running_var", "num_batches_tracked")


@contextmanager
def _batchnorm_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of every BatchNorm inside ``module`` when the block exits."""
    saved = [(m, {name: getattr(m, name).clone() for name in _BATCHNORM_STATE if getattr(m, name) is not None})
             for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        yield
    finally:
        with torch.no_grad():
            for bn, state in saved:
                for name, value in state.items():
                    getattr(bn, name).copy_(value)


def _checkpointed_forward(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        calls = 0

        def once_then_recompute(*inner: Any, **inner_kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*inner, **inner_kwargs)
            with _batchnorm_statistics_kept(module):
                return forward(*inner, **inner_kwargs)

        return checkpoint(once_then_recompute, *args, use_reentrant=False, **kwargs)

    return run


@contextmanager
def activation_checkpointing(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Within the block, each of ``modules`` runs under :func:`torch.utils.checkpoint.checkpoint` (non-reentrant)
    when it is in train mode with gradients enabled; outside it, and in eval mode, they run as before. Outputs,
    gradients and BatchNorm statistics equal those of the ordinary forward."""
    modules = list(dict.fromkeys(modules))
    for module in modules:
        if "forward" in module.__dict__:
            raise RuntimeError(f"{type(module).__name__} is already under activation checkpointing")
        module.forward = _checkpointed_forward(module, module.forward)
    try:
        yield
    finally:
        for module in modules:
            del module.forward
