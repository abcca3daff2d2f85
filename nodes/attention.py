"""ConvRot Quantized Attention: a MODEL clone whose attention runs the INT8/FP8 kernel (convrot/triton_attention.py).

ComfyUI's own mechanism carries it: `transformer_options["optimized_attention_override"]` in the clone's
model_options. Every attention call that goes through ComfyUI's optimized_attention (FLUX's attention() in
comfy/ldm/flux/math.py among them) then passes through `override`; calls the kernel does not handle (a mask, fp32,
another head size, GQA, CPU tensors) run whatever would have run without this node (an override set before, else
ComfyUI's attention). Off unless the node is used. Where the kernel cannot run at all (CPU, GPU before sm_80, no
Triton, a failed probe) the node passes the model through unchanged with one log line saying why.

Composition: the override sits in transformer_options, which ComfyUI copies per sampling call, so LoRAs, the
ConvRot loader and other patches are untouched. The kernel is one torch.library custom op with a shape-only fake,
so torch.compile (ConvRot Compile Blocks, the loader's speed=auto, TorchCompileModel) keeps it one graph node, and
the host code never synchronises (CUDA graphs). Triton launches its kernels through its Python launcher, which
under ComfyUI's default cudaMallocAsync allocator cannot be captured into a CUDA graph (see nodes/graph.py).

CONVROT_QATTN_REFERENCE=1 (tests) runs the PyTorch reference of the same arithmetic, on any device.
"""
from __future__ import annotations

import logging
import os

import torch

from comfy_api.latest import io

from ..convrot import attention as qattn
from ..convrot import triton_attention

log = logging.getLogger("convrot")

NAME = "ConvRot Quantized Attention"
OVERRIDE_KEY = "optimized_attention_override"
MARKER_KEY = "convrot_quantized_attention"  # set beside the override: what runs (for other nodes and tests)
ENV_REFERENCE = "CONVROT_QATTN_REFERENCE"

_logged: set = set()


def _log_once(reason: str, level=logging.INFO) -> None:
    if reason not in _logged and not torch.compiler.is_compiling():
        _logged.add(reason)
        log.log(level, "%s: %s", NAME, reason)


def _unsupported(q, k, v, mask, skip_reshape, kwargs, reference: bool) -> str | None:
    """Why this call runs the attention it would have run without the node (None: it runs quantized)."""
    if mask is not None:
        return "an attention mask (runs ComfyUI's attention)"
    if kwargs.get("low_precision_attention", True) is False:  # as ComfyUI's own sage attention honours it
        return "the model asks for full-precision attention here (runs ComfyUI's attention)"
    if kwargs.get("enable_gqa", False):
        return "grouped-query attention (runs ComfyUI's attention)"
    if not skip_reshape and (q.dim() != 3 or k.dim() != 3 or v.dim() != 3):
        return f"inputs of shape {tuple(q.shape)} (runs ComfyUI's attention)"
    if skip_reshape and (q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:2] != q.shape[:2]
                         or v.shape[:2] != q.shape[:2] or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]):
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (runs ComfyUI's attention)"
    seq = -2 if skip_reshape else 1
    if k.shape[seq] != v.shape[seq] or (not skip_reshape and (k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]
                                                               or k.shape[-1] != q.shape[-1]
                                                               or v.shape[-1] != q.shape[-1])):
        return f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} (runs ComfyUI's attention)"
    if q.dtype != k.dtype or q.dtype != v.dtype:
        return f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype} (runs ComfyUI's attention)"
    if reference:
        return None
    if q.device.type != "cuda":
        return f"{q.device.type} tensors (runs ComfyUI's attention)"
    if q.dtype not in triton_attention.KERNEL_DTYPES:
        return f"{q.dtype} (the kernel takes fp16/bf16; runs ComfyUI's attention)"
    return None


def make_override(cfg: qattn.QAttnConfig, reference: bool = False, previous=None):
    """optimized_attention_override(func, q, k, v, heads, ...) running the quantized attention of `cfg`."""

    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        reason = _unsupported(q, k, v, mask, skip_reshape, kwargs, reference)
        if reason is None:
            b = q.shape[0]
            if skip_reshape:
                dim_head = q.shape[-1]
                q4, k4, v4 = q, k, v
            else:
                dim_head = q.shape[-1] // heads
                q4, k4, v4 = (t.reshape(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
            if dim_head not in qattn.HEAD_DIMS:
                reason = f"head size {dim_head} (the kernel takes {qattn.HEAD_DIMS}; runs ComfyUI's attention)"
        if reason is not None:
            _log_once(reason)
            fallback = func if previous is None else (lambda *a, **kw: previous(func, *a, **kw))
            return fallback(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                            skip_output_reshape=skip_output_reshape, **kwargs)
        scale = kwargs.get("scale")
        if reference and q4.device.type != "cpu":
            out = qattn.reference_attention(q4, k4, v4, cfg, scale).transpose(1, 2)  # [B, L, H, D]
        else:
            out = triton_attention.run_op(q4, k4, v4, cfg, scale)  # [B, L, H, D]; the reference for CPU tensors
        if skip_output_reshape:
            return out.transpose(1, 2)
        return out.reshape(b, out.shape[1], heads * dim_head)

    override.convrot_qattn = cfg  # noqa: B010 - lets tests and other nodes see what is installed
    # its Triton kernels start through Triton's Python launcher, which CUDA graphs cannot capture under
    # cudaMallocAsync (nodes/graph.py asks)
    override.convrot_python_launchers = not reference  # noqa: B010
    return override


def _load_device(model_patcher) -> torch.device:
    dev = getattr(model_patcher, "load_device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def quantized_attention_model(model_patcher, cfg: qattn.QAttnConfig = qattn.DEFAULT, reference: bool | None = None):
    """A clone of `model_patcher` whose attention is quantized, or the model itself (one log line) where the kernel
    cannot run. reference=None reads CONVROT_QATTN_REFERENCE."""
    if reference is None:
        reference = os.environ.get(ENV_REFERENCE, "0") not in ("0", "")
    dev = _load_device(model_patcher)
    if reference:
        run_cfg = cfg
        what = f"the PyTorch reference ({ENV_REFERENCE}=1): {cfg.describe()}"
    else:
        ok, why = triton_attention.available(dev, cfg=cfg)
        if not ok:
            log.info("%s: off, %s; the model passes through unchanged", NAME, why)
            return model_patcher
        run_cfg = triton_attention.device_config(cfg, dev)
        what = why
    m = model_patcher.clone()
    to = m.model_options.setdefault("transformer_options", {})
    previous = to.get(OVERRIDE_KEY)
    if previous is not None and getattr(previous, "convrot_qattn", None) is not None:
        previous = getattr(previous, "convrot_previous", None)  # applied twice: replace ours, keep what was below
    ov = make_override(run_cfg, reference, previous)
    ov.convrot_previous = previous  # noqa: B010
    to[OVERRIDE_KEY] = ov
    to[MARKER_KEY] = run_cfg.describe()
    log.info("%s: on, %s", NAME, what)
    return m


class ConvRotQuantizedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConvRotQuantizedAttention",
            display_name=NAME,
            category="model/optimization",
            description="Run the model's attention quantized, SageAttention-style: Q and K in INT8 with per-block "
                        "scales (K smoothed), softmax in fp32, P·V in FP8 (bf16 before sm_89), one Triton kernel. "
                        "Experimental: on an H200 it is slower than ComfyUI's default (cuDNN) attention, 0.5x at "
                        "FLUX's 1024² size; for experiments, not speed. Needs an NVIDIA GPU (sm_80+) and Triton; "
                        "otherwise the model passes through unchanged and the log says why. Masked attention and "
                        "other unsupported calls run ComfyUI's attention.",
            inputs=[io.Model.Input("model")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        return io.NodeOutput(quantized_attention_model(model))
