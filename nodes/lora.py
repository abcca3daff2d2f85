"""LoRA and other weight patches on ConvRot layers, applied next to the quantized GEMM instead of merged into it.

ComfyUI's LoRA loaders (LoraLoader, LoraLoaderModelOnly, any node calling ModelPatcher.add_patches) store patches
keyed by weight name, e.g. `diffusion_model.double_blocks.0.img_attn.qkv.weight`, in `ModelPatcher.patches`; the
patcher merges them into float weights while loading. A ConvRot layer's weight is a buffer of 4-bit codes, which the
patcher never merges into (see nodes/ops.py). Instead two ModelPatcher callbacks (`ON_LOAD`, after every load or
re-load of the weights, and `ON_PRE_RUN`, at the start of every sampling run) hand each quantized layer the patch list
of the patcher that is running, so clones with and without LoRAs can share one model. Per layer:

* LoRA (`LoRAAdapter` without DoRA/mid/reshape): y += s * (x @ Aᵀ) @ Bᵀ in the activation dtype, s = strength *
  alpha / rank; several LoRAs stack (one down-projection holding every branch's rank, so x is read once per layer,
  then one in-place up-projection per output slice); negative strengths work; slices into fused layers (FLUX
  qkv/linear1 patches carry an offset (0, start, length)) add to that output slice.
* Other additive patches (`diff`, LoHa, LoKr, LoRA with a mid/Tucker factor): their dense delta ΔW is computed once,
  without touching the quantized weight, and applied as an extra matmul y += x @ ΔWᵀ (slower; logged once).
* Patches that depend on the weight itself (DoRA, OFT/BOFT, GLoRA, `set`, `model_as_lora`, strength_model != 1,
  patch functions, nested patch lists): the whole list is evaluated by ComfyUI's `comfy.lora.calculate_weight` on the
  dequantized weight once, and the resulting ΔW is applied as above (slow path, logged once).
Nothing is ignored: shapes that do not fit raise an error naming the layer.
"""
from __future__ import annotations

import logging

import torch

from ..convrot import lowrank

log = logging.getLogger("convrot")

_DORA_INDEX = {"lora": 4, "loha": 7, "lokr": 8}
_warned: set[str] = set()
CALLBACK_KEY = "convrot_lora"


def _warn_once(key: str, msg: str) -> None:
    """Log once per kind of slow path (not once per layer: a DoRA LoRA can touch hundreds of layers)."""
    if key not in _warned:
        _warned.add(key)
        log.warning("ConvRot: %s", msg)


def _adapter_base():
    import comfy.weight_adapter as wa
    return wa.WeightAdapterBase


def _diff_tensor(v):
    """The tensor of a plain `diff` patch, or None if `v` is something else (or a padding diff)."""
    if isinstance(v, tuple) and len(v) == 1 and isinstance(v[0], torch.Tensor):
        return v[0]
    if isinstance(v, tuple) and len(v) == 2 and v[0] == "diff":
        data = v[1]
        if len(data) > 1 and isinstance(data[1], dict) and data[1].get("pad_weight"):
            return None
        return data[0]
    return None


def _kind(p) -> str:
    """'lowrank', 'dense' (additive, weight-independent) or 'weight' (needs the weight) for one patch entry."""
    strength, v, strength_model, offset, function = p
    if strength_model != 1.0 or function is not None or isinstance(v, list):
        return "weight"
    if offset is not None and offset[0] != 0:
        return "weight"
    if isinstance(v, _adapter_base()):
        name = getattr(v, "name", "")
        if name not in _DORA_INDEX or v.weights[_DORA_INDEX[name]] is not None:
            return "weight"
        if name == "lora":
            if v.weights[5] is not None:  # reshape: changes the layer's shape
                return "weight"
            return "lowrank" if v.weights[3] is None else "dense"
        return "dense"
    return "dense" if _diff_tensor(v) is not None else "weight"


def _describe(p) -> str:
    v = p[1]
    if isinstance(v, _adapter_base()):
        return getattr(v, "name", type(v).__name__)
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str):
        return v[0]
    return type(v).__name__


class Prepared:
    """One layer's patches ready for one device and dtype."""
    __slots__ = ("down", "ups", "dense", "folded", "checked")

    def __init__(self, down, ups, dense, folded=None):
        self.down = down      # [sum of ranks, K] or None: every low-rank branch's down-projection
        self.ups = ups        # [(start, length, r0, r1, up)]: per output slice, its rank columns and up-projection
        self.dense = dense    # [N, K] delta or None
        self.folded = folded  # convrot.lowrank.LowRankCodes: the branches folded into the GEMM's K, or None
        self.checked = False  # whether the folded codes' clamp counter was read after a first call


class LayerPatches:
    """The patch list one quantized layer currently runs with, and its device/dtype-ready form."""

    def __init__(self):
        self.key: str | None = None
        self.token = None
        self.patches: list | None = None
        self._cache: dict = {}

    def __bool__(self) -> bool:
        return bool(self.patches)

    def set(self, key: str, patches, token) -> None:
        if key == self.key and token == self.token:
            return
        self.key, self.token = key, token
        self.patches = list(patches) if patches else None
        self._cache = {}

    def clear(self) -> None:
        self.set(self.key, None, None)

    def prepare(self, layer, device, dtype):
        """The patches in the form `apply` uses on (device, dtype), computed once per patch set.

        Called from the ON_PRE_RUN callback for the model's device and inference dtype, so the first step doesn't
        pay for it layer by layer; `apply` prepares lazily for anything else.
        """
        ck = (torch.device(device), dtype)
        prep = self._cache.get(ck)
        if prep is None:
            with torch.no_grad():
                prep = self._prepare(layer, ck[0], dtype)
            self._cache = {ck: prep}  # only the current device/dtype: an offloaded copy would pin memory
        return prep

    def _get(self, layer, x: torch.Tensor) -> Prepared:
        prep = self._cache.get((x.device, x.dtype))
        return prep if prep is not None else self.prepare(layer, x.device, x.dtype)

    def folded_linear(self, layer, x: torch.Tensor, w: torch.Tensor, bias) -> torch.Tensor | None:
        """The layer's output with every LoRA branch folded into its W4A4 GEMM, or None where that doesn't apply
        (then the caller runs the GEMM and `apply`). Patched layers never run inside torch.compile graphs
        (nodes/ops.py _PatchedForward), so this Python state is never traced."""
        prep = self._get(layer, x)
        codes = prep.folded
        if codes is None or not x.numel():
            return None
        x2 = x.reshape(-1, layer.in_features).contiguous()
        y = lowrank.linear(x2, w, bias, layer.convrot_group_size, codes).view(*x.shape[:-1], layer.out_features)
        if not prep.checked:
            prep.checked = True  # one synchronisation per layer and patch set, on its first call
            if self.check_clamps(layer, prep):
                return None  # recomputed exactly by the caller
        return y

    def check_clamps(self, layer, prep: Prepared) -> bool:
        """True (and the layer switched to exact branches, with a warning) if folded codes were ever clamped."""
        clamped = 0 if prep.folded is None else int(prep.folded.clamped.item())
        if clamped == 0:
            return False
        log.warning("ConvRot: the LoRA on %s is too strong for its folded 8-bit codes (%d clamped); that layer "
                    "now applies it as an exact separate branch", layer._layer_name or self.key, clamped)
        prep.folded = None
        return True

    def apply(self, layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        prep = self._get(layer, x)
        down, ups, dense = prep.down, prep.ups, prep.dense
        # in place on this call's fresh output: one read + one write of y per update instead of the three passes
        # and a temporary of `y + h` (the updates are memory-bound; this is most of a LoRA's cost per step)
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        if down is not None:
            h = x2 @ down.t()  # every branch's rank at once: x is read once per layer
            for start, length, r0, r1, up in ups:
                target = y2 if start is None else y2[:, start:start + length]
                target.addmm_(h[:, r0:r1], up.t())
        if dense is not None:
            y2.addmm_(x2, dense.t())
        return y

    # ---------------------------------------------------------------- preparation (once per patch set and device)

    def _prepare(self, layer, device, dtype):
        name = layer._layer_name or self.key
        out_f, in_f = layer.out_features, layer.in_features
        kinds = [_kind(p) for p in self.patches]
        if "weight" in kinds:
            import comfy.lora
            what = sorted({_describe(p) for p, k in zip(self.patches, kinds) if k == "weight"})
            _warn_once(f"weight:{what}", f"patches {what} depend on the weight (first seen on {name}); they are "
                       f"applied as a dense delta computed once from the dequantized weight (slow path: an extra "
                       f"full matmul per call on each such layer)")
            w = layer.dequantized_weight(torch.float32).to(device)
            patched = comfy.lora.calculate_weight(self.patches, w.clone(), self.key, intermediate_dtype=torch.float32)
            if tuple(patched.shape) != (out_f, in_f):
                raise RuntimeError(f"ConvRot: patches change the shape of {name} to {tuple(patched.shape)}; "
                                   f"shape-changing patches are not supported on quantized layers")
            return Prepared(None, [], (patched - w).to(dtype))

        groups: dict[tuple, tuple[list, list]] = {}
        dense = None
        for p, kind in zip(self.patches, kinds):
            strength, v, _, offset, _ = p
            if strength == 0:
                continue
            start, length = (offset[1], offset[2]) if offset is not None else (None, None)
            rows = length if length is not None else out_f
            if start is not None and (start < 0 or start + length > out_f):
                raise RuntimeError(f"ConvRot: patch slice {offset} is outside {name} ({out_f} outputs)")
            if kind == "lowrank":
                up, down, alpha = v.weights[0], v.weights[1], v.weights[2]
                up, down = up.flatten(1), down.flatten(1)
                if down.shape[1] != in_f or up.shape[0] != rows or up.shape[1] != down.shape[0]:
                    raise RuntimeError(
                        f"ConvRot: LoRA for {name} has shapes up {tuple(up.shape)} / down {tuple(down.shape)}, "
                        f"which do not fit the layer slice [{rows} x {in_f}]")
                scale = strength * (alpha / down.shape[0] if alpha is not None else 1.0)
                ups, downs = groups.setdefault((start, length), ([], []))
                ups.append(up.to(device=device, dtype=torch.float32) * scale)
                downs.append(down.to(device=device, dtype=torch.float32))
                continue
            # additive dense patch: its delta does not depend on the weight
            _warn_once(f"dense:{_describe(p)}", f"{_describe(p)} patches (first seen on {name}) are applied as a dense "
                       f"delta: an extra full matmul per call on each such layer")
            diff = _diff_tensor(v)
            if diff is not None:
                delta = strength * diff.to(device=device, dtype=torch.float32)
            else:
                zero = torch.zeros(rows, in_f, device=device, dtype=torch.float32)
                delta = v.calculate_weight(zero, self.key, strength, 1.0, None, lambda a: a, torch.float32)
            if tuple(delta.shape) != (rows, in_f):
                raise RuntimeError(f"ConvRot: {_describe(p)} patch for {name} has shape {tuple(delta.shape)}, "
                                   f"expected {(rows, in_f)}")
            if dense is None:
                dense = torch.zeros(out_f, in_f, device=device, dtype=torch.float32)
            if start is None:
                dense += delta
            else:
                dense[start:start + length] += delta
        downs_all, ups_all, r = [], [], 0
        for (start, length), (ups, downs) in groups.items():
            d, u = torch.cat(downs, 0), torch.cat(ups, 1)
            downs_all.append(d)
            ups_all.append((start, length, r, r + d.shape[0], u.to(dtype).contiguous()))
            r += d.shape[0]
        down_f32 = torch.cat(downs_all, 0) if downs_all else None
        down = down_f32.to(dtype).contiguous() if down_f32 is not None else None
        folded = None
        if down is not None and dense is None and layer.convrot_bits == 4 and lowrank.kernels_can_fold(device, dtype):
            # one [N, R] up-projection with each branch in its output slice, folded into the GEMM (convrot.lowrank)
            up_full = torch.zeros(out_f, r, device=device, dtype=torch.float32)
            for start, length, r0, r1, up in ups_all:
                rows = slice(None) if start is None else slice(start, start + length)
                up_full[rows, r0:r1] = up.to(torch.float32)
            folded = lowrank.prepare(down_f32, up_full, layer.weight_scale.to(device), dtype)
        return Prepared(down, ups_all, (dense.to(dtype) if dense is not None else None), folded)


def sync_patches(patcher, *args, prepare: bool = False, **kwargs) -> None:
    """ModelPatcher callback: give every ConvRot layer the running patcher's patches for its weight (and, before a
    run, their device-ready form)."""
    from .ops import quantized_layers, route_forward
    model = patcher.model
    layers = getattr(model, "_convrot_layers", None)
    if layers is None:
        layers = [(f"{n}.weight", m) for n, m in quantized_layers(model)]
        model._convrot_layers = layers
    dtype = patcher.model.get_dtype_inference() if prepare else None
    for key, m in layers:
        m.convrot_patches.set(key, patcher.patches.get(key), patcher.patches_uuid)
        route_forward(m)
        if prepare and m.convrot_patches and dtype in (torch.float16, torch.bfloat16, torch.float32):
            prep = m.convrot_patches.prepare(m, patcher.load_device, dtype)
            if prep.checked:  # a previous run with these patches: were any folded codes clamped since?
                m.convrot_patches.check_clamps(m, prep)


def _sync_and_prepare(patcher, *args, **kwargs) -> None:
    sync_patches(patcher, prepare=True)


def install(patcher) -> None:
    """Register the callbacks on a freshly loaded ModelPatcher; clones (LoRA loaders, model patches) copy them."""
    from comfy.patcher_extension import CallbacksMP
    patcher.add_callback_with_key(CallbacksMP.ON_LOAD, CALLBACK_KEY, sync_patches)
    patcher.add_callback_with_key(CallbacksMP.ON_PRE_RUN, CALLBACK_KEY, _sync_and_prepare)
    sync_patches(patcher)
