"""ComfyUI operations that load FLUX linear layers as ConvRot W4A4/W8A8 QuantizedTensors.

`make_ops(spec, compute_dtype)` returns a subclass of ComfyUI's own `comfy.ops.mixed_precision_ops` (the ops ComfyUI
uses for quantized files); pass it as `model_options["custom_operations"]` to `comfy.sd.load_diffusion_model`. Only
`Linear` changes. Per layer, `_load_from_state_dict` turns the file's tensors into what ComfyUI's quantized loader
reads and lets it build the layer:
  * a float layer that the plan quantizes becomes ConvRot codes + scale + `comfy_quant` (computed on the GPU when
    there is one), so the weight is a `QuantizedTensor` of ComfyUI's ConvRot layouts (nodes/layout.py);
  * an already-quantized native `convrot_w4a4` / ConvRot `int8_tensorwise` layer is checked and used as stored;
  * every other layer stays in floating point (fp8 scales folded in).
From then on ComfyUI's model patcher, dynamic VRAM, offloading and saving treat the weights as their own quantized
tensors. What differs from ComfyUI's quantized Linear is the forward and weight patching: a quantized layer runs
`convrot.ops.qlinear` on the stored codes, and LoRA/weight patches never reach the codes: ComfyUI's merge
(convert_weight/set_weight) and its per-call low-VRAM patch functions are turned into no-ops for quantized weights,
and nodes/lora.py applies the patches as branches next to the quantized GEMM.
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
from ..convrot.policy import BF16, W4A4, strip_prefix
from .layout import convrot_format
from .lora import LayerPatches

log = logging.getLogger("convrot")


LR_KEYS = ("convrot_lr_down", "convrot_lr_up")  # a +lr layer's branch, as buffers (and state-dict keys)


@dataclass
class LoadSpec:
    """What the loader decided from the file header before ComfyUI builds the model."""
    file_name: str
    group_size: int = 256
    actions: dict[str, str] = field(default_factory=dict)  # layer (no prefix) -> bf16 | w4a4 | w8a8 | keep
    confs: dict[str, dict] = field(default_factory=dict)   # layer (no prefix) -> comfy_quant config (header form)
    quant_device: torch.device | None = None                # where weights are quantized (GPU when present)
    progress: Callable[[str], None] | None = None           # called once per linear layer loaded
    correction_rank: int = 0                                # > 0: W4A4 layers get convrot/correction.py's branch

    @classmethod
    def from_plan(cls, file_name, group_size, actions, confs, **kw) -> "LoadSpec":
        return cls(file_name, group_size, {strip_prefix(k): v for k, v in actions.items()},
                   {strip_prefix(k): v for k, v in confs.items()}, **kw)


class ConvRotLinearOp:
    """Mixed into ComfyUI's mixed-precision Linear by make_ops: loading, forward and patching of ConvRot layers."""

    _spec: LoadSpec | None = None
    convrot_bits: int | None = None   # None: a floating point layer (ComfyUI's own forward)
    convrot_group_size: int = 256

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._layer_name = ""
        self.convrot_patches = LayerPatches()
        # The low-rank correction of a W4A4 layer quantized while loading (preset PRESET+lr): y += (x·Aᵀ)·Bᵀ. Buffers,
        # so ComfyUI moves them with the module; None (the default) leaves them out of the state dict.
        self.register_buffer(LR_KEYS[0], None)  # A [r, in]
        self.register_buffer(LR_KEYS[1], None)  # B [out, r]

    # ------------------------------------------------------------------ loading

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        spec = self._spec
        name = strip_prefix(prefix[:-1])
        self._layer_name = name
        where = f"{spec.file_name if spec else 'model'}: {name}"
        get = lambda k: state_dict.get(prefix + k)  # noqa: E731
        stored_lr = [state_dict.pop(prefix + k, None) for k in LR_KEYS]  # a +lr model saved by ComfyUI's own nodes
        lr_before = [getattr(self, k) for k in LR_KEYS]
        w = get("weight")
        if w is not None:
            conf_t = get("comfy_quant")
            conf = decode_conf(conf_t, where) if conf_t is not None else (spec.confs.get(name) if spec else None)
            params = convrot_params(conf, where) if conf is not None else None  # refuses unknown formats by name
            if params is not None:
                self._check_stored(w, get("weight_scale"), *params, where)
                state_dict[prefix + "weight"] = w.view(torch.int8)
                state_dict[prefix + "comfy_quant"] = encode_conf(conf)
            else:
                self._prepare_float(state_dict, prefix, get, conf, where)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        fmt = convrot_format(getattr(self, "weight", None))
        self.convrot_bits, self.convrot_group_size = fmt if fmt is not None else (None, 256)
        if fmt is not None:
            # ComfyUI's fused paths that read a quantized weight without calling forward (newer comfy.ops'
            # linear_input_act runs int8_tensorwise weights on comfy-kitchen directly) fall back to forward for
            # full-precision layers; ours need forward (our kernels, LoRA branches). Forward never reads it, and the
            # saved config comes from _full_precision_mm_config, which stays as loaded.
            self._full_precision_mm = True
        if any(t is not None for t in stored_lr):
            self._load_stored_correction(*stored_lr, where)
        for k, before in zip(LR_KEYS, lr_before):  # a branch computed by this load is not missing from the file
            if getattr(self, k) is not None and getattr(self, k) is not before and prefix + k in missing_keys:
                missing_keys.remove(prefix + k)
        for k in list(state_dict):
            if k.startswith(prefix) and k[len(prefix):] in LAYER_SIDE_KEYS:
                unexpected_keys.append(k)  # left over: a scale without a quantized weight
        if spec is not None and spec.progress is not None:
            spec.progress(name)

    def _prepare_float(self, state_dict, prefix, get, conf, where: str) -> None:
        """Replace a float layer's entries by what ComfyUI's loader reads: ConvRot codes + config where the plan
        quantizes it, else the float weight with any fp8 scale folded in."""
        w = get("weight")
        if conf is not None and w.dtype not in FP8_DTYPES:
            raise CheckpointError(f"{where}: float8 layer config on a {w.dtype} weight")
        fw = float_weight(get, conf is not None)
        for sub in LAYER_SIDE_KEYS:
            state_dict.pop(prefix + sub, None)
        spec = self._spec
        action = spec.actions.get(self._layer_name, BF16) if spec else BF16
        g = spec.group_size if spec else 256
        if action != BF16 and self.in_features % g:
            action = BF16  # the plan logged it; a layer ComfyUI adds beyond the plan lands here too
        if action == BF16:
            state_dict[prefix + "weight"] = fw  # ComfyUI's loader casts it to the compute dtype
            return
        bits = 4 if action == W4A4 else 8
        if bits == 4 and spec is not None and spec.correction_rank:
            q, s = self._quantize_corrected(fw, g, spec.correction_rank, where)
        else:
            q, s = self._quantize(fw, g, bits, where)
        state_dict[prefix + "weight"] = q
        state_dict[prefix + "weight_scale"] = s
        state_dict[prefix + "comfy_quant"] = encode_conf(layer_conf(action, g))

    def _quantize(self, w: torch.Tensor, g: int, bits: int, where: str):
        q, s = self._on_quant_device(lambda src: cr_ops.quantize_weight(src, g, bits), w, "quantizing", where)
        target = self._target()
        return q.to(target), s.to(target)

    def _target(self) -> torch.device:
        return self.factory_kwargs["device"] or torch.device("cpu")  # where ComfyUI keeps the model's weights

    def _on_quant_device(self, fn, w: torch.Tensor, what: str, where: str):
        """fn(w) on the device the loader quantizes on (the GPU when there is one), else on the CPU."""
        qdev = (self._spec.quant_device if self._spec else None) or self._target()
        try:
            return fn(w.to(qdev) if w.device != torch.device(qdev) else w)
        except Exception as e:  # GPU out of memory or a kernel that refuses this input: the CPU always works
            if torch.device(qdev).type == "cpu":
                raise
            log.warning("ConvRot: %s %s on %s failed (%s: %s); using the CPU", what, where, qdev,
                        type(e).__name__, e)
            return fn(w.to("cpu", torch.float32))

    def state_dict(self, *args, destination=None, prefix="", **kwargs):
        # ComfyUI's quantized Linear writes its own state dict (codes, scales, comfy_quant) and skips buffers; a
        # +lr layer's codes are those of the residual, so the branch must be saved with them
        sd = super().state_dict(*args, destination=destination, prefix=prefix, **kwargs)
        for k in LR_KEYS:
            t = getattr(self, k)
            if t is not None:
                sd[prefix + k] = t
        return sd

    def _load_stored_correction(self, down, up, where: str) -> None:
        """The branch of a `+lr` layer as ComfyUI's own save nodes write it (the layer's buffers): its codes are
        those of the residual, so it must come back with them or the load fails."""
        if self.convrot_bits != 4 or self.convrot_lr_down is not None:
            raise CheckpointError(f"{where}: low-rank correction tensors on a layer that is not a stored W4A4 layer")
        if down is None or up is None or down.dim() != 2 or up.dim() != 2 or down.shape[1] != self.in_features \
                or up.shape != (self.out_features, down.shape[0]):
            shapes = [None if t is None else tuple(t.shape) for t in (down, up)]
            raise CheckpointError(f"{where}: low-rank correction {LR_KEYS} has shapes {shapes}, expected "
                                  f"[r, {self.in_features}] and [{self.out_features}, r]")
        self._set_correction(down, up)

    def _set_correction(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """The branch as this layer's buffers, where its weights live, in the compute dtype."""
        dtype = self.factory_kwargs.get("dtype") or torch.bfloat16
        self.convrot_lr_down, self.convrot_lr_up = down.to(self._target(), dtype), up.to(self._target(), dtype)

    def _quantize_corrected(self, w: torch.Tensor, g: int, rank: int, where: str):
        """W4A4 codes of the residual and the branch (convrot.correction), on the GPU when there is one."""
        from ..convrot.correction import quantize_with_correction
        cw = self._on_quant_device(lambda src: quantize_with_correction(src, g, 4, rank=rank), w,
                                   "the correction of", where)
        self._set_correction(cw.down, cw.up)
        return cw.codes.to(self._target()), cw.scale.to(self._target())

    def _check_stored(self, q: torch.Tensor, scale, bits: int, g: int, where: str) -> None:
        packed_k = self.in_features // 2 if bits == 4 else self.in_features
        if scale is None:
            raise CheckpointError(f"{where}: ConvRot layer without weight_scale")
        if q.dim() != 2 or tuple(q.shape) != (self.out_features, packed_k) or q.element_size() != 1:
            raise CheckpointError(f"{where}: quantized weight is {q.dtype} {tuple(q.shape)}, expected int8 "
                                  f"{(self.out_features, packed_k)} for a {bits}-bit layer "
                                  f"[{self.out_features} x {self.in_features}]")
        if scale.numel() != self.out_features:
            raise CheckpointError(f"{where}: weight_scale has {scale.numel()} values, expected {self.out_features}")
        if self.in_features % g:
            raise CheckpointError(f"{where}: in_features {self.in_features} is not a multiple of its ConvRot group "
                                  f"size {g}")

    # ------------------------------------------------------------------ ComfyUI's weight patching

    # ComfyUI merges weight patches (LoRA) through convert_weight -> comfy.lora.calculate_weight -> set_weight
    # (ModelPatcher.patch_weight_to_device). For a quantized weight that would dequantize the layer, merge, and
    # requantize with stochastic rounding. Here convert_weight keeps the real (moved) QuantizedTensor aside and hands
    # ComfyUI a meta tensor of the same shape, so its merge arithmetic runs on no data; set_weight then installs the
    # kept tensor. The patches themselves reach the layer through nodes/lora.py and run as branches.

    def convert_weight(self, weight, inplace=False, **kwargs):
        if convrot_format(weight) is None:
            return super().convert_weight(weight, inplace=inplace, **kwargs)
        self.__dict__["_convrot_pending"] = weight.to(dtype=self.weight.dtype)  # orig dtype only; codes as moved
        return torch.empty(weight.shape, dtype=torch.float32, device="meta")

    def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
        pending = self.__dict__.pop("_convrot_pending", None)
        if self.convrot_bits is None:
            return super().set_weight(weight, inplace_update=inplace_update, seed=seed, return_weight=return_weight,
                                      **kwargs)
        if pending is None or weight.device.type != "meta":
            raise RuntimeError(f"ConvRot: ComfyUI tried to write a {weight.dtype} weight into the quantized layer "
                               f"{self._layer_name}; ConvRot applies weight patches as branches and never merges "
                               f"them into its codes")
        if return_weight:
            return pending
        self.weight = torch.nn.Parameter(pending, requires_grad=False)

    # Dynamic VRAM attaches a layer's weight patches as `weight_lowvram_function`, applied to the dequantized weight
    # on every cast (then requantized). A quantized layer reports none; the patches run as branches instead.
    @property
    def weight_lowvram_function(self):
        return None if self.convrot_bits else self.__dict__.get("_convrot_weight_lowvram_function")

    @weight_lowvram_function.setter
    def weight_lowvram_function(self, value):
        self.__dict__["_convrot_weight_lowvram_function"] = value

    def _check_weight_functions(self):
        for f in self.weight_function:
            # ComfyUI's (non-dynamic) lowvram mode hands each offloaded layer its weight patches as a LowVramPatch;
            # ours come through the patcher callbacks, so that copy is skipped rather than merged into the codes.
            if not getattr(f, "is_lowvram_patch", False):
                raise RuntimeError(f"ConvRot: weight functions ({type(f).__name__}) cannot be applied to the "
                                   f"quantized layer {self._layer_name}")

    # ------------------------------------------------------------------ forward

    def forward(self, input, *args, **kwargs):
        if self.convrot_bits is None:
            return super().forward(input, *args, **kwargs)
        comfy.ops.run_every_op()
        return self.forward_convrot(input)

    def forward_convrot(self, x: torch.Tensor) -> torch.Tensor:
        w, bias = self.weight, self.bias
        resident = (not self.comfy_cast_weights and w.device == x.device
                    and (bias is None or bias.device == x.device) and not self.bias_function)
        if resident:
            y = self._linear(x, w, bias)
        else:  # dynamic VRAM / offloading: ComfyUI brings the codes (and the patched bias) for this call
            if self.weight_function:
                self._check_weight_functions()
            saved = self.__dict__.get("weight_function")
            self.weight_function = []  # LowVramPatch entries: applied as branches, never to the codes
            try:
                w, bias, offload = comfy.ops.cast_bias_weight(self, None, dtype=w.dtype, device=x.device,
                                                              bias_dtype=x.dtype, offloadable=True)
            finally:
                if saved is None:
                    del self.weight_function
                else:
                    self.weight_function = saved
            y = self._linear(x, w, bias)
            comfy.ops.uncast_bias_weight(self, w, bias, offload)
        return y

    def _linear(self, x: torch.Tensor, w, bias) -> torch.Tensor:
        y = self._quantized_linear(x, w, bias)
        down = self.convrot_lr_down
        if down is not None:  # the correction, like an unfused LoRA; traceable, so compiled blocks keep it inline
            up = self.convrot_lr_up
            if down.device != x.device or down.dtype != x.dtype:  # an offloaded layer: moved per call
                down, up = down.to(x.device, x.dtype, non_blocking=True), up.to(x.device, x.dtype, non_blocking=True)
            y = y + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)
        return y

    def _quantized_linear(self, x: torch.Tensor, w, bias) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.nn.functional.linear(x, w, bias)  # traced through the layout's handler (nodes/layout.py)
        codes, scale = w._qdata, w._params.scale
        patches = self.convrot_patches
        if patches:
            y = patches.folded_linear(self, x, codes, bias)  # LoRA branches inside the GEMM (sm_90)
            if y is not None:
                return y
        y = cr_ops.qlinear(x, codes, scale, bias, self.convrot_group_size, self.convrot_bits)
        if patches:
            y = patches.apply(self, x, y)
        return y

    @property
    def weight_scale(self) -> torch.Tensor:
        """The per-row fp32 scale of the quantized weight (where the weight is stored)."""
        return self.weight._params.scale

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        from ..convrot.reference import dequantize_weight
        w = dequantize_weight(self.weight._qdata, self.weight_scale, self.convrot_group_size, self.convrot_bits, dtype)
        if self.convrot_lr_down is not None:  # the effective weight includes the correction
            w = w + (self.convrot_lr_up.to(w.device, dtype) @ self.convrot_lr_down.to(w.device, dtype))
        return w

    def extra_repr(self):
        base = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.convrot_bits is None:
            return base
        lr = "" if self.convrot_lr_down is None else f", correction_rank={self.convrot_lr_down.shape[0]}"
        return f"{base}, convrot=w{self.convrot_bits}a{self.convrot_bits}, group_size={self.convrot_group_size}{lr}"


class _PatchedForward:
    """`forward` of a LoRA-patched quantized layer (set per instance by route_forward): it runs outside any
    torch.compile graph. Traced, these layers set off a cascade of graph breaks and recompilations on the H100
    (bench/NOTES.md); as an instance attribute the break falls at the block's call of the layer, so Dynamo never
    compiles the layer as a frame of its own, and eagerly the LoRA stays folded into the GEMM. Holds the layer
    weakly: a bound method on the instance would make a cycle that keeps its GPU tensors alive longer."""

    __slots__ = ("ref",)

    def __init__(self, layer):
        self.ref = weakref.ref(layer)

    @torch.compiler.disable
    def __call__(self, x, *args, **kwargs):
        comfy.ops.run_every_op()
        return self.ref().forward_convrot(x)


def route_forward(layer: ConvRotLinearOp) -> None:
    """Patched layers forward through _PatchedForward, unpatched ones through the class's (traceable) forward.

    A forward someone else set on the instance is left alone: ComfyUI's bypass LoRA loader injects its own
    (`module.forward = hook`, calling the forward it replaced), and removing it would drop that LoRA silently. The
    branches of this layer's own patches run inside forward_convrot either way."""
    cur = layer.__dict__.get("forward")
    ours = isinstance(cur, _PatchedForward)
    if cur is not None and not ours:
        return
    if layer.convrot_patches:
        if not (ours and cur.ref() is layer):  # (a deep copy keeps the original's)
            layer.forward = _PatchedForward(layer)
    elif ours:
        del layer.__dict__["forward"]


def make_ops(spec: LoadSpec | None, compute_dtype: torch.dtype = torch.bfloat16) -> type:
    """A ComfyUI operations class bound to one file's load plan: ComfyUI's mixed-precision ops, ConvRot Linear."""
    base = comfy.ops.mixed_precision_ops({}, compute_dtype)

    class ConvRotOps(base):
        convrot_spec = spec

        class Linear(ConvRotLinearOp, base.Linear):
            _spec = spec

    return ConvRotOps


def quantized_layers(model: torch.nn.Module) -> list[tuple[str, ConvRotLinearOp]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ConvRotLinearOp) and m.convrot_bits]
