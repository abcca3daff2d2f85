"""ConvRot W4A4 Loader: a FLUX diffusion model file -> a ComfyUI MODEL whose linear layers run in W4A4/W8A8."""
from __future__ import annotations

import collections
import logging
import os


import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..convrot.checkpoint import FP8_DTYPES, CheckpointError
from ..convrot.convert import header_layer_confs, plan_file
from ..convrot.hadamard import SUPPORTED_GROUP_SIZES, check_group_size
from ..convrot.policy import PRESETS, parse_overrides
from . import lora
from .ops import LoadSpec, make_ops, quantized_layers

log = logging.getLogger("convrot")

PRESET_CHOICES = ["mixed", "w4a4", "compact", "w8a8"]
GROUP_CHOICES = [str(g) for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True)]  # "256", "64", "16"


def _quant_device():
    """Quantize on the GPU ComfyUI computes on (not under --cpu, and not a different card than it uses)."""
    dev = comfy.model_management.get_torch_device()
    return dev if dev.type == "cuda" else None


def compute_dtype(infos, device) -> torch.dtype:
    """The dtype ComfyUI would run this file's float weights in (fp8 files: their bf16/fp16 compute dtype)."""
    floats = [i.dtype for k, i in infos.items() if k.endswith(".weight") and i.dtype.is_floating_point]
    src = max(set(floats), key=floats.count) if floats else torch.bfloat16
    if src in FP8_DTYPES:
        src = torch.bfloat16
    return comfy.model_management.unet_dtype(device=device, supported_dtypes=[torch.bfloat16, torch.float16,
                                                                              torch.float32], weight_dtype=src)


def load_convrot_model(path: str, preset: str = "mixed", group_size: int | str = 256, overrides: str = "",
                       progress: bool = True):
    """Load a FLUX transformer file through ComfyUI with ConvRot layers; returns a ModelPatcher.

    Everything that can be checked from the header is checked before ComfyUI reads a tensor: truncation, FLUX
    layout, per-layer quantization formats, group size and that at least one layer gets quantized.
    """
    name = os.path.basename(path)
    try:
        g = check_group_size(int(group_size))
    except ValueError as e:
        raise CheckpointError(f"{name}: {e}") from e
    if preset not in PRESETS and preset != "quality":
        raise CheckpointError(f"{name}: unknown ConvRot preset {preset!r}; choose one of {PRESET_CHOICES}")
    try:
        parse_overrides(overrides)
    except ValueError as e:
        raise ValueError(f"ConvRot overrides: {e}") from e
    plan, infos, meta = plan_file(path, g, preset, overrides)  # raises CheckpointError naming file/layer
    confs = header_layer_confs(meta, name)
    n_layers = len(plan.actions)
    pbar = comfy.utils.ProgressBar(n_layers) if progress else None
    spec = LoadSpec.from_plan(
        name, g, plan.actions, confs,
        quant_device=_quant_device(),
        progress=(lambda layer: pbar.update(1)) if pbar is not None else None)
    try:
        dtype = compute_dtype(infos, comfy.model_management.get_torch_device())
        patcher = comfy.sd.load_diffusion_model(path, model_options={"custom_operations": make_ops(spec, dtype),
                                                                     "dtype": dtype})
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{name}: ComfyUI could not load this file with ConvRot layers "
                              f"({type(e).__name__}: {e})") from e
    layers = quantized_layers(patcher.model)
    if not layers:
        raise CheckpointError(f"{name}: no layer was quantized (is this a FLUX transformer?)")
    counts = collections.Counter(f"w{m.convrot_bits}a{m.convrot_bits}" for _, m in layers)
    log.info("ConvRot: %s loaded with preset %s, group size %d: %s quantized layers, %d kept in floating point",
             name, preset, g, dict(counts), n_layers - len(layers))
    lora.install(patcher)
    return patcher


class ConvRotW4A4Loader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConvRotW4A4Loader",
            display_name="ConvRot W4A4 Loader",
            category="model/loaders",
            description="Load a FLUX.1 diffusion model and run its linear layers in 4-bit weights and activations "
                        "with ConvRot (regular-Hadamard group rotation). bf16/fp16/fp8 files are quantized while "
                        "loading; files saved by ConvRot Save Quantized load as stored.",
            inputs=[
                io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                               tooltip="A FLUX.1 transformer from models/diffusion_models."),
                io.Combo.Input("preset", options=PRESET_CHOICES, default="mixed",
                               tooltip="; ".join(f"{k}: {v}" for k, v in PRESETS.items())),
                io.Combo.Input("group_size", options=GROUP_CHOICES, default="256",
                               tooltip="Rotation group size; 256 is the most accurate."),
                io.String.Input("overrides", multiline=True, default="", optional=True,
                                tooltip="Per-layer actions, one 'pattern = action' per line (action: bf16, w4a4, "
                                        "w8a8; glob patterns such as single_blocks.3*) or a JSON object."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, unet_name, preset="mixed", group_size="256", overrides="") -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("diffusion_models", unet_name)
        return io.NodeOutput(load_convrot_model(path, preset, group_size, overrides or ""))
