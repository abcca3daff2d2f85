"""Model-wide quantization of an in-memory nn.Module under a layer policy."""
from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from .linear import ConvRotLinear
from .policy import BF16, W4A4, LayerPolicy

log = logging.getLogger("convrot")


def quantize_model(model: nn.Module, group_size: int = 256, policy: LayerPolicy | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> dict[str, str]:
    """Replace each nn.Linear the policy selects with a ConvRotLinear, in place. Returns {layer: action}."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    policy = policy or LayerPolicy.for_names([f"{n}.weight" for n in names])
    plan = {}
    for n in names:
        act = policy.action(n)
        mod = model.get_submodule(n)
        if act != BF16 and mod.in_features % group_size:
            log.info("ConvRot: %s stays unquantized: in_features %d is not a multiple of group size %d",
                     n, mod.in_features, group_size)
            act = BF16
        plan[n] = act
    todo = [n for n, a in plan.items() if a != BF16]
    for i, n in enumerate(todo):
        mod = model.get_submodule(n)
        q = ConvRotLinear.from_float(mod.weight.data, mod.bias.data if mod.bias is not None else None, group_size,
                                     4 if plan[n] == W4A4 else 8)
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
        if progress:
            progress(i + 1, len(todo), n)
    return plan
