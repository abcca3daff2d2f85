"""ConvRot weights as ComfyUI's own quantized tensors, computed by ConvRot's kernels.

ComfyUI (v0.29+) represents a quantized weight as `comfy.quant_ops.QuantizedTensor` (comfy-kitchen) with a layout:
native `convrot_w4a4` layers use `TensorCoreConvRotW4A4Layout` (int8 [N, K/2] packed codes, fp32 per-row scale) and
ConvRot W8A8 layers `TensorWiseINT8Layout` with `convrot=True` (int8 [N, K], per-row scale). Its loader, dynamic
VRAM, offloading, saving and LoRA machinery all handle those tensors. Registering the linear ops of the two layouts
here makes every such tensor run on ConvRot's kernels (`convrot.ops.qlinear`): the pack's own layers, and native
ConvRot files loaded by stock "Load Diffusion Model", once the pack is installed. comfy-kitchen's own handlers stay
for what ConvRot does not compute: non-ConvRot int8 weights, transposed products, quantized inputs.

F.linear on a QuantizedTensor reaches `__torch_dispatch__` as aten.linear, or decomposed into aten.t (a flag flip,
kitchen's) followed by aten.mm / aten.addmm with the transposed weight as right operand; all three are taken.
"""
from __future__ import annotations

import logging

import torch

from comfy.quant_ops import QuantizedTensor

from ..convrot import ops as cr_ops

log = logging.getLogger("convrot")

W4A4_LAYOUT = "TensorCoreConvRotW4A4Layout"
INT8_LAYOUT = "TensorWiseINT8Layout"


def convrot_format(weight) -> tuple[int, int] | None:
    """(bits, group size) of a ConvRot QuantizedTensor weight, or None for anything else."""
    if not isinstance(weight, QuantizedTensor):
        return None
    p = weight._params
    if weight._layout_cls == W4A4_LAYOUT:
        return 4, int(p.convrot_groupsize)
    if weight._layout_cls == INT8_LAYOUT and getattr(p, "convrot", False):
        return 8, int(p.convrot_groupsize)
    return None


def _ours(x, weight, transposed: bool):
    """(bits, G) where ConvRot computes x·Wᵀ for this call, else None (kitchen's handler runs)."""
    fmt = convrot_format(weight)
    if fmt is None or isinstance(x, QuantizedTensor) or not isinstance(x, torch.Tensor):
        return None
    if bool(getattr(weight._params, "transposed", False)) != transposed or not x.dtype.is_floating_point:
        return None
    if x.shape[-1] != weight._params.orig_shape[0 if transposed else 1]:  # K of W [N, K] or of Wᵀ [K, N]
        return None
    return fmt


def _run(x, weight, bias, fmt):
    bits, g = fmt
    return cr_ops.qlinear(x, weight._qdata, weight._params.scale, bias, g, bits)


def _handlers(original):
    def linear(qt, args, kwargs):
        x, w = args[0], args[1]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        fmt = _ours(x, w, transposed=False)
        return _run(x, w, bias, fmt) if fmt is not None else original["linear"](qt, args, kwargs)

    def mm(qt, args, kwargs):
        x, w = args[0], args[1]
        fmt = _ours(x, w, transposed=True)
        return _run(x, w, None, fmt) if fmt is not None else original["mm"](qt, args, kwargs)

    def addmm(qt, args, kwargs):
        bias, x, w = args[0], args[1], args[2]
        plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and bias is not None and bias.dim() == 1
        fmt = _ours(x, w, transposed=True) if plain else None
        return _run(x, w, bias, fmt) if fmt is not None else original["addmm"](qt, args, kwargs)
    return {"linear": linear, "mm": mm, "addmm": addmm}


_OPS = {"linear": torch.ops.aten.linear.default, "mm": torch.ops.aten.mm.default,
        "addmm": torch.ops.aten.addmm.default}
_registered: list = []


def register() -> bool:
    """Route ConvRot QuantizedTensors' linear ops to ConvRot's kernels (idempotent). False without comfy-kitchen."""
    if _registered:
        return True
    try:
        from comfy_kitchen.tensor.base import _LAYOUT_DISPATCH_TABLE, get_layout_class
        layouts = [get_layout_class(W4A4_LAYOUT), get_layout_class(INT8_LAYOUT)]
    except Exception as e:  # ComfyUI without comfy-kitchen has no QuantizedTensor: nothing to route
        log.error("ConvRot: comfy-kitchen's quantized tensors are unavailable (%s: %s); ConvRot layers need them "
                  "(ComfyUI v0.29+ installs comfy-kitchen)", type(e).__name__, e)
        return False
    for layout in layouts:
        original = {}
        for name, op in _OPS.items():
            kitchen = _LAYOUT_DISPATCH_TABLE.get(op, {}).get(layout)
            original[name] = kitchen if kitchen is not None else _dequantized(op)
        for name, fn in _handlers(original).items():
            _LAYOUT_DISPATCH_TABLE.setdefault(_OPS[name], {})[layout] = fn
        _registered.append((layout, original))
    return True


def _dequantized(op):
    from comfy_kitchen.tensor.base import dequantize_args

    def fallback(qt, args, kwargs):
        return op(*dequantize_args(args), **dequantize_args(kwargs))
    return fallback
