"""ComfyUI custom operations that quantize FLUX linear layers to ConvRot W4A4/W8A8 while the state dict is read.

`make_ops(spec)` returns a subclass of ComfyUI's `comfy.ops.manual_cast`; pass it as
`model_options["custom_operations"]` to `comfy.sd.load_diffusion_model`. Only `Linear` is replaced. Per layer, its
`_load_from_state_dict` either
  * keeps the layer in floating point (ComfyUI's manual-cast Linear, LoRA and offloading untouched),
  * quantizes a bf16/fp16/fp32/fp8 weight into packed int8 codes + an fp32 scale (on the GPU when there is one), or
  * adopts an already-quantized native `convrot_w4a4` / ConvRot `int8_tensorwise` layer as stored.
A quantized layer holds `weight` (int8, packed for 4 bit) and `weight_scale` (fp32) as *buffers* and `bias` as a
Parameter. Buffers are never handed to ModelPatcher.patch_weight_to_device, so ComfyUI never tries to merge LoRA
patches into 4-bit codes; they move with `module.to()` (full loads) or are copied to the input's device per call
(lowvram / dynamic offloading). LoRA patches reach the layer through ModelPatcher callbacks (see nodes/lora.py) and
are applied as branches next to the quantized GEMM.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.model_management
import comfy.ops

from ..convrot import ops as cr_ops
from ..convrot.checkpoint import (
    FP8_DTYPES, LAYER_SIDE_KEYS, CheckpointError, convrot_params, decode_conf, encode_conf, float_weight, layer_conf)
from ..convrot.policy import BF16, W4A4, W8A8, strip_prefix
from .lora import LayerPatches


class _WeakSetWeight:
    """A quantized layer's `set_weight`, holding the layer weakly: a bound method stored on the instance would make
    a layer -> method -> layer cycle that only the cyclic GC frees, keeping the layer's GPU buffers alive longer."""

    __slots__ = ("ref",)

    def __init__(self, layer):
        self.ref = weakref.ref(layer)

    def __call__(self, *args, **kwargs):
        return self.ref()._convrot_set_weight(*args, **kwargs)

log = logging.getLogger("convrot")

# per-layer keys a quantized layer consumes besides weight/bias (fp8 scales are folded into the new codes)


@dataclass
class LoadSpec:
    """What the loader decided from the file header before ComfyUI builds the model."""
    file_name: str
    group_size: int = 256
    actions: dict[str, str] = field(default_factory=dict)  # layer (no prefix) -> bf16 | w4a4 | w8a8 | keep
    confs: dict[str, dict] = field(default_factory=dict)   # layer (no prefix) -> comfy_quant config (header form)
    quant_device: torch.device | None = None                # where weights are quantized (GPU when present)
    progress: Callable[[str], None] | None = None           # called once per linear layer loaded

    @classmethod
    def from_plan(cls, file_name, group_size, actions, confs, **kw) -> "LoadSpec":
        return cls(file_name, group_size, {strip_prefix(k): v for k, v in actions.items()},
                   {strip_prefix(k): v for k, v in confs.items()}, **kw)


class ConvRotLinearOp(comfy.ops.manual_cast.Linear):
    """ComfyUI manual-cast Linear that can turn itself into a ConvRot quantized layer while loading."""

    _spec: LoadSpec | None = None
    convrot_bits: int | None = None   # None: a plain (floating point) ComfyUI layer
    convrot_group_size: int = 256
    _convrot_fast = None              # ((device, dtype), kernel call or None), see _fast_fn

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        # Allocate nothing real: every tensor is assigned from the state dict, so peak RAM stays near the
        # quantized size instead of holding a float copy of each layer next to its codes.
        super().__init__(in_features, out_features, bias, device="meta", dtype=dtype)
        self._target_device = device
        self._target_dtype = dtype
        self._layer_name = ""
        self.convrot_patches = LayerPatches()

    # ------------------------------------------------------------------ loading

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        spec = self._spec
        name = strip_prefix(prefix[:-1])
        self._layer_name = name
        file_name = spec.file_name if spec else "model"
        where = f"{file_name}: {name}"
        get = lambda k: state_dict.get(prefix + k)  # noqa: E731
        w, b = get("weight"), get("bias")
        conf_t = get("comfy_quant")
        conf = decode_conf(conf_t, where) if conf_t is not None else (spec.confs.get(name) if spec else None)
        device = self._target_device if self._target_device is not None else torch.device("cpu")

        if w is None:
            missing_keys.append(prefix + "weight")
            self.weight = torch.nn.Parameter(torch.zeros(self.out_features, self.in_features, device=device,
                                                         dtype=self._target_dtype or torch.float32),
                                             requires_grad=False)
        else:
            params = convrot_params(conf, where) if conf is not None else None  # refuses unknown formats by name
            if params is not None:
                bits, g = params
                scale = get("weight_scale")
                if scale is None:
                    raise CheckpointError(f"{where}: ConvRot layer without weight_scale")
                self._become_quantized(w.view(torch.int8), scale, bits, g, device, where)
            else:
                if conf is not None and w.dtype not in FP8_DTYPES:
                    raise CheckpointError(f"{where}: float8 layer config on a {w.dtype} weight")
                fw = float_weight(get, conf is not None)
                action = spec.actions.get(name, BF16) if spec else BF16
                g = spec.group_size if spec else 256
                if action != BF16 and self.in_features % g:
                    action = BF16
                if action == BF16:
                    dtype = self._target_dtype if self._target_dtype not in (None,) + FP8_DTYPES else (
                        torch.bfloat16 if fw.dtype == torch.float32 and w.dtype in FP8_DTYPES else fw.dtype)
                    copy = not local_metadata.get("assign_to_params_buffers", False)
                    t = fw.to(device=device, dtype=dtype, copy=copy and fw is w)
                    self.weight = torch.nn.Parameter(t, requires_grad=False)
                else:
                    self._quantize_from_float(fw, action, g, device, where)

        if self.bias is not None or b is not None:
            if b is None:
                missing_keys.append(prefix + "bias")
                b = torch.zeros(self.out_features)
            dtype = self._target_dtype if self._target_dtype not in (None,) + FP8_DTYPES else (
                b.dtype if b.dtype not in FP8_DTYPES else torch.bfloat16)
            self.bias = torch.nn.Parameter(b.to(device=device, dtype=dtype, copy=True), requires_grad=False)

        for k in list(state_dict):
            if k.startswith(prefix):
                sub = k[len(prefix):]
                if sub not in ("weight", "bias") + LAYER_SIDE_KEYS:
                    unexpected_keys.append(k)
        if spec is not None and spec.progress is not None:
            spec.progress(name)

    def _quantize_from_float(self, w: torch.Tensor, action: str, g: int, device, where: str) -> None:
        bits = 4 if action == W4A4 else 8
        qdev = (self._spec.quant_device if self._spec else None) or device
        try:
            src = w.to(qdev) if w.device != torch.device(qdev) else w
            if src.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                src = src.to(torch.float32)
            q, s = cr_ops.quantize_weight(src, g, bits)
        except Exception as e:  # GPU out of memory or a kernel that refuses this input: the CPU always works
            if torch.device(qdev).type == "cpu":
                raise
            log.warning("ConvRot: quantizing %s on %s failed (%s: %s); using the CPU", where, qdev,
                        type(e).__name__, e)
            q, s = cr_ops.quantize_weight(w.to("cpu", torch.float32), g, bits)
        self._become_quantized(q, s, bits, g, device, where)

    def _become_quantized(self, q: torch.Tensor, scale: torch.Tensor, bits: int, g: int, device, where: str):
        packed_k = self.in_features // 2 if bits == 4 else self.in_features
        if q.dim() != 2 or tuple(q.shape) != (self.out_features, packed_k):
            raise CheckpointError(f"{where}: quantized weight has shape {tuple(q.shape)}, expected "
                                  f"{(self.out_features, packed_k)} for a {bits}-bit layer "
                                  f"[{self.out_features} x {self.in_features}]")
        if scale.numel() != self.out_features:
            raise CheckpointError(f"{where}: weight_scale has {scale.numel()} values, expected {self.out_features}")
        if self.in_features % g:
            raise CheckpointError(f"{where}: in_features {self.in_features} is not a multiple of its ConvRot group "
                                  f"size {g}")
        if "weight" in self._parameters:
            del self._parameters["weight"]
        self.register_buffer("weight", q.to(device=device, dtype=torch.int8))
        self.register_buffer("weight_scale", scale.reshape(self.out_features).to(device=device,
                                                                                  dtype=torch.float32))
        self.convrot_bits, self.convrot_group_size = bits, g
        self._convrot_fast = None
        self.set_weight = _WeakSetWeight(self)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.convrot_bits is not None:
            destination[prefix + "comfy_quant"] = encode_conf(
                layer_conf(W4A4 if self.convrot_bits == 4 else W8A8, self.convrot_group_size))

    # ------------------------------------------------------------------ ComfyUI patching hooks

    def _convrot_set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        """`set_weight` of a quantized layer, which ModelPatcher.patch_weight_to_device calls for `<layer>.weight`.

        Only quantized layers get it (as an instance attribute, in _become_quantized): floating point layers keep
        ComfyUI's default patching exactly. A plain device move of the codes (dynamic VRAM's force load of a tiny
        module) is accepted; merged patches cannot be (they arrive as branches, see nodes/lora.py).
        """
        if weight.dtype != torch.int8 or weight.shape != self.weight.shape:
            raise RuntimeError(
                f"ConvRot: ComfyUI tried to merge weight patches into the quantized layer {self._layer_name}; "
                f"ConvRot applies LoRA as a branch instead and cannot merge into 4-bit codes (this happens for "
                f"hook/scheduled LoRAs or force-patched loads, which ConvRot layers do not support)")
        if return_weight:
            return weight
        self._buffers["weight"] = weight
        return None

    # ------------------------------------------------------------------ forward

    def forward(self, input, *args, **kwargs):
        if self.convrot_bits is None:
            return super().forward(input, *args, **kwargs)
        comfy.ops.run_every_op()
        return self.forward_convrot(input)

    def _cast_bias(self, x: torch.Tensor):
        if self.bias is None:
            return None
        # a copy only when patches will modify it; otherwise .to() is free for a bias already on x's device/dtype
        bias = self.bias.to(device=x.device, dtype=x.dtype, copy=bool(self.bias_function))
        for f in self.bias_function:
            bias = f(bias)
        lowvram_fn = getattr(self, "bias_lowvram_function", None)
        if lowvram_fn is not None and hasattr(self, "_v"):  # dynamic VRAM keeps bias patches here
            bias = lowvram_fn(bias)
        return bias

    def _check_weight_functions(self):
        wkey = self.convrot_patches.key
        for f in self.weight_function:
            # ComfyUI's lowvram mode hands each offloaded layer its weight patches as a LowVramPatch; ours come
            # through the patcher callbacks, so that copy is skipped rather than merged into 4-bit codes.
            if getattr(f, "is_lowvram_patch", False) and (wkey is None or f.key == wkey):
                continue
            raise RuntimeError(f"ConvRot: weight functions ({type(f).__name__}) cannot be applied to the quantized "
                               f"layer {self._layer_name}")

    def forward_convrot(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != torch.int8:
            raise RuntimeError(f"ConvRot: the quantized weight of {self._layer_name} was replaced by a {w.dtype} "
                               f"tensor (a weight patch merged outside ConvRot?)")
        if self.weight_function:
            self._check_weight_functions()
        dev = x.device
        s = self.weight_scale
        if w.device != dev or s.device != dev:  # lowvram / dynamic offloading: copy the codes for this call
            non_blocking = comfy.model_management.device_supports_non_blocking(dev)
            w, s = w.to(dev, non_blocking=non_blocking), s.to(dev, non_blocking=non_blocking)
        bias = self._cast_bias(x)
        patches = self.convrot_patches
        if patches:
            y = patches.folded_linear(self, x, w, bias)  # LoRA branches inside the GEMM (sm_90), else None
            if y is not None:
                return y
        # under torch.compile the checked path is traced once, so its per-call cost doesn't matter there
        fn = None if torch.compiler.is_compiling() else self._fast_fn(dev, x.dtype)
        if fn is not None and x.numel():
            y = fn(x.reshape(-1, self.in_features).contiguous(), w, s, bias).view(*x.shape[:-1], self.out_features)
        else:
            y = cr_ops.linear(x, w, s, bias, self.convrot_group_size, self.convrot_bits)
        if patches:
            y = patches.apply(self, x, y)
        return y

    def _fast_fn(self, device: torch.device, dtype: torch.dtype):
        """The kernel call for this layer on (device, dtype), decided on the first call there (see fast_linear_fn)."""
        self._convrot_fast, fn = cr_ops.cached_fast_linear_fn(
            self._convrot_fast, device, dtype, self.in_features, self.out_features, self.convrot_group_size,
            self.convrot_bits)
        return fn

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        from ..convrot.reference import dequantize_weight
        return dequantize_weight(self.weight, self.weight_scale, self.convrot_group_size, self.convrot_bits, dtype)

    def extra_repr(self):
        if self.convrot_bits is None:
            return super().extra_repr()
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"convrot=w{self.convrot_bits}a{self.convrot_bits}, group_size={self.convrot_group_size}")


class _PatchedForward:
    """`forward` of a LoRA-patched quantized layer (set per instance by route_forward): it runs outside any
    torch.compile graph. Traced, these layers set off a cascade of graph breaks and recompilations on the H100
    (0.29-0.33 s/step against 0.14 eager and 0.105 compiled without LoRA, bench/NOTES.md); as an instance
    attribute the break falls at the block's call of the layer, so Dynamo never compiles the layer as a frame of its
    own, and eagerly the LoRA stays folded into the GEMM. The elementwise work between layers still compiles.
    Holds the layer weakly, like _WeakSetWeight."""

    __slots__ = ("ref",)

    def __init__(self, layer):
        self.ref = weakref.ref(layer)

    @torch.compiler.disable
    def __call__(self, x, *args, **kwargs):
        comfy.ops.run_every_op()
        return self.ref().forward_convrot(x)


def route_forward(layer: ConvRotLinearOp) -> None:
    """Patched layers forward through _PatchedForward, unpatched ones through the class's (traceable) forward."""
    if layer.convrot_patches:
        cur = layer.__dict__.get("forward")
        if not (isinstance(cur, _PatchedForward) and cur.ref() is layer):  # (a deep copy keeps the original's)
            layer.forward = _PatchedForward(layer)
    else:
        layer.__dict__.pop("forward", None)


def make_ops(spec: LoadSpec | None) -> type:
    """A ComfyUI operations class bound to one file's load plan."""

    class ConvRotOps(comfy.ops.manual_cast):
        convrot_spec = spec

        class Linear(ConvRotLinearOp):
            _spec = spec

    return ConvRotOps


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, ConvRotLinearOp]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ConvRotLinearOp) and m.convrot_bits]
