"""ConvRot Save Quantized: write a ConvRot MODEL as a native-format safetensors file into the first folder ComfyUI
lists for `diffusion_models`: `models/unet/` on a default install (ComfyUI lists `models/unet/` before
`models/diffusion_models/` and both loaders read both), or the first `diffusion_models` path of extra_model_paths.yaml.

Key names are those of a stock file of the model's family (FLUX: `double_blocks.0.img_attn.qkv.weight`,
`...query_norm.scale`; see families.Family.saved_name), quantized layers carry `weight` (int8), `weight_scale` (fp32) and `comfy_quant`, so both ComfyUI's stock
"Load Diffusion Model" and the ConvRot loader read the file. The file is streamed to a temporary
`<name>.<random>.part` beside it and renamed only when complete.
"""
from __future__ import annotations

import json
import logging
import os

import torch

import comfy.model_management
import folder_paths
from comfy_api.latest import io

from ..convrot import families
from ..convrot.checkpoint import StreamingWriter, TensorInfo
from ..convrot.correction import SUFFIX
from .ops import quantized_layers

log = logging.getLogger("convrot")


def stock_namer(model):
    """key -> the name a stock file of this model's family has (ComfyUI's model configs rename some on load)."""
    config = getattr(getattr(model, "model_config", None), "unet_config", None) or {}
    family = families.by_image_model(config.get("image_model"))
    return family.saved_name if family is not None else (lambda key: key)


def _out_tensor(key: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.dtype == torch.float32 and not key.endswith(".weight_scale"):
        # ComfyUI computes in fp32 on some devices; the values came from a bf16/fp16 file, so bf16 keeps the
        # file the size of a stock one (exact for bf16 sources)
        t = t.to(torch.bfloat16)
    return t


def save_convrot_model(patcher, path: str, metadata: dict | None = None) -> str:
    model = patcher.model
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("ConvRot Save Quantized: this MODEL has no ConvRot layers; load it with ConvRot W4A4 Loader")
    corrected = [n for n, m in layers if m.convrot_lr_down is not None]
    if corrected:
        # ComfyUI's convrot_w4a4 format has no place for it: a stock loader would drop the branch and run the
        # residual codes alone, a silently wrong model
        raise ValueError(f"ConvRot Save Quantized: {len(corrected)} layers carry the low-rank correction of a "
                         f"'{SUFFIX}' preset (e.g. {corrected[0]}), which the convrot_w4a4 file format cannot hold. "
                         f"Save the model loaded without '{SUFFIX}', or keep loading the original file with it.")
    patched = [k for k in patcher.patches if k.startswith("diffusion_model.")]
    if patched:
        raise ValueError(f"ConvRot Save Quantized: the MODEL carries {len(patched)} LoRA/weight patches (e.g. "
                         f"{patched[0]}); they cannot be merged into 4-bit weights. Save the model before the LoRA "
                         f"loaders.")
    # make sure the float weights are this patcher's (unpatched) ones, not those of a clone loaded last
    comfy.model_management.load_models_gpu([patcher])
    sd = model.diffusion_model.state_dict()
    name = stock_namer(model)
    tensors = {name(k): _out_tensor(k, v) for k, v in sd.items()}
    specs = {k: TensorInfo(v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    meta = {"convrot": json.dumps({"layers": len(layers),
                                   "group_sizes": sorted({m.convrot_group_size for _, m in layers})})}
    meta.update(metadata or {})
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with StreamingWriter(path, specs, meta) as w:
        for k, v in tensors.items():
            w.write(k, v)
    log.info("ConvRot: saved %s (%d quantized layers; the loaders list it under diffusion_models)", path, len(layers))
    return path


class ConvRotSaveQuantized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConvRotSaveQuantized",
            display_name="ConvRot Save Quantized",
            category="advanced/model_merging",
            description="Save a MODEL from ConvRot W4A4 Loader as a native ConvRot safetensors file in the first "
                        "diffusion_models folder (models/unet on a default install), listed by Load Diffusion "
                        "Model and ConvRot W4A4 Loader like any file in models/diffusion_models.",
            inputs=[
                io.Model.Input("model"),
                io.String.Input("filename_prefix", default="convrot/flux_w4a4",
                                tooltip="Subfolder and name under the first diffusion_models folder (models/unet "
                                        "on a default install); a counter is appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, filename_prefix="convrot/flux_w4a4") -> io.NodeOutput:
        out_dir = folder_paths.get_folder_paths("diffusion_models")[0]  # models/unet on a default install
        full_dir, filename, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, out_dir)
        path = os.path.join(full_dir, f"{filename}_{counter:05}_.safetensors")
        save_convrot_model(model, path)
        return io.NodeOutput(ui={"text": [os.path.relpath(path, out_dir)]})
