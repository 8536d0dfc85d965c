"""Data-built state: the buffers a model computes from data rather than learns by gradient (memory banks,
coresets, exemplar features, decision thresholds).

Modules declare them with :func:`register_data_buffer`; :func:`data_buffers` finds every declared buffer of a
model by its full name. Distributed training broadcasts exactly these from rank 0 (and keeps DDP from
syncing them every step), and checkpoints record their names, so a new or renamed data-built buffer can
neither stay rank-local nor go missing from a file unnoticed.
"""

import torch
from torch import nn

_DECLARED = "_data_buffer_names"


def register_data_buffer(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """``module.register_buffer(name, tensor)``, declared as built from data."""
    module.register_buffer(name, tensor)
    if _DECLARED not in module.__dict__:
        setattr(module, _DECLARED, set())
    getattr(module, _DECLARED).add(name)


def data_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(full name, buffer)`` of every data-built buffer of ``model`` and its submodules, in module order."""
    found = []
    for prefix, module in model.named_modules():
        for name in sorted(module.__dict__.get(_DECLARED, ())):
            found.append((f"{prefix}.{name}" if prefix else name, getattr(module, name)))
    return found
