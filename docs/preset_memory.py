"""Transformer weight memory of each ConvRot preset, derived from the engine's own layer policy.

    python docs/preset_memory.py            # table for FLUX.1-dev / schnell / Kontext (same shapes)
    python docs/preset_memory.py --markdown # the same as a Markdown table (pasted into web/docs and the README)
    python docs/preset_memory.py --families # every covered family (needs ComfyUI: COMFYUI_PATH or ../ComfyUI)

Shapes come from `convrot.flux.FluxConfig()` (hidden 3072, 19 double + 38 single blocks), built on the meta device,
so nothing is allocated. Per linear layer, with `LayerPolicy(preset).action(name)`:
  bf16 = 2 bytes/weight; W4A4 = 0.5 byte/weight + 4 bytes (fp32 scale) per output channel;
  W8A8 = 1 byte/weight + 4 bytes per output channel. Biases, norms and every non-linear tensor stay bf16.
Activations, text encoders and VAE are not included: this is the size of the transformer file / its weights in VRAM.

The other families (`--families`) are ComfyUI's own model classes built on the meta device with the real models'
configurations (FAMILY_CONFIGS: the constants comfy/model_detection.py sets per family, and the sizes it reads
from a real file's shapes), planned tensor by tensor by `convrot.convert.plan_tensors`, the loader's own planning,
so group-size exceptions and the per-family rules are those of a real load.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from convrot.demo import projected_bytes  # noqa: E402
from convrot.flux import FluxConfig  # noqa: E402
from convrot.correction import SUFFIX, split_preset  # noqa: E402
from convrot.policy import PRESETS  # noqa: E402

PRESET_ORDER = ("mixed", "w4a4", "compact", "w8a8")
LR_PRESETS = tuple(p + SUFFIX for p in ("mixed", "compact"))  # the loader's +lr choices (FLUX.1 table only)


def describe(preset: str) -> str:
    base, rank = split_preset(preset)
    if not rank:
        return PRESETS[base]
    return (f"`{base}` plus a rank-{rank} low-rank correction on its W4A4 layers, computed while loading (closer to "
            f"bf16; ConvRot Save Quantized cannot write it)")

_FLUX2 = dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, mlp_ratio=3.0,
              axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, txt_ids_dims=[3],
              global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
              ref_index_scale=10.0)
# (label, ComfyUI class, constructor arguments): what ComfyUI's detection builds for each released model
FAMILY_CONFIGS = (
    ("FLUX.2 [dev] (32B)", "comfy.ldm.flux.model.Flux",
     dict(_FLUX2, hidden_size=6144, num_heads=48, depth=8, depth_single_blocks=48, context_in_dim=15360,
          guidance_embed=True)),
    ("FLUX.2 [klein] 9B", "comfy.ldm.flux.model.Flux",
     dict(_FLUX2, hidden_size=4096, num_heads=32, depth=8, depth_single_blocks=24, context_in_dim=12288,
          guidance_embed=False)),
    ("FLUX.2 [klein] 4B", "comfy.ldm.flux.model.Flux",
     dict(_FLUX2, hidden_size=3072, num_heads=24, depth=5, depth_single_blocks=20, context_in_dim=7680,
          guidance_embed=False)),
    ("Chroma (8.9B)", "comfy.ldm.chroma.model.Chroma",
     dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=4096, hidden_size=3072,
          mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000,
          patch_size=2, qkv_bias=True, in_dim=64, out_dim=3072, hidden_dim=5120, n_layers=5, txt_ids_dims=[],
          vec_in_dim=None)),
    ("Qwen-Image (20B)", "comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
     dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=60)),
    ("Wan 2.1 / 2.2 14B (per expert)", "comfy.ldm.wan.model.WanModel",
     dict(image_model="wan2.1", model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16,
          out_dim=16, text_dim=4096, freq_dim=256)),
)


def _comfy_class(dotted: str):
    import importlib
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.join(here, "..", "tests"))
    from comfy_env import comfyui_path, install_stubs
    path = comfyui_path()
    if path is None:
        sys.exit("--families needs ComfyUI: set COMFYUI_PATH or put it at ../ComfyUI")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    install_stubs()
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # meta tensors only: ComfyUI need not probe a GPU
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def family_bytes(dotted: str, config: dict, group_size: int = 256) -> dict[str, int]:
    """Bytes of all transformer weights per preset (and "bf16") of a ComfyUI model class built with `config`."""
    import torch
    from convrot.checkpoint import TensorInfo, nbytes
    from convrot.convert import detect_family, plan_tensors
    cls = _comfy_class(dotted)
    import comfy.ops
    with torch.device("meta"):
        model = cls(**config, dtype=torch.bfloat16, device="meta",
                                     operations=comfy.ops.disable_weight_init)
    infos = {k: TensorInfo(torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()}
    family = detect_family(infos, config["image_model"]).name
    out = {"bf16": sum(nbytes(i) for i in infos.values()), "family": family}
    for preset in PRESET_ORDER:
        out[preset] = plan_tensors(infos, {}, config["image_model"], group_size, preset, family=family).bytes_out
    return out


def families_markdown() -> str:
    rows = ["| model | bf16 | " + " | ".join(f"`{p}`" for p in PRESET_ORDER) + " |",
            "|---|---|" + "---|" * len(PRESET_ORDER)]
    for label, dotted, config in FAMILY_CONFIGS:
        b = family_bytes(dotted, config)
        cells = [f"{gb(b[p])} ({b['bf16'] / b[p]:.1f}x)" for p in PRESET_ORDER]
        rows.append(f"| {label} | {gb(b['bf16'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def preset_bytes(cfg: FluxConfig | None = None) -> dict[str, int]:
    """Bytes of all transformer weights per preset, plus the bf16 baseline under the key "bf16"."""
    cfg = cfg or FluxConfig()
    out = {}
    for preset in PRESET_ORDER + LR_PRESETS:
        out[preset], out["bf16"] = projected_bytes(cfg, preset)
    return out


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def markdown_table(cfg: FluxConfig | None = None) -> str:
    sizes = preset_bytes(cfg)
    base = sizes["bf16"]
    rows = ["| preset | transformer weights (FLUX.1-dev, 12B) | vs bf16 | what it does |",
            "|---|---|---|---|"]
    for p in PRESET_ORDER + LR_PRESETS:
        default = " (default)" if p == "mixed" else ""
        rows.append(f"| `{p}`{default} | {gb(sizes[p])} | {sizes[p] / base:.0%} | {describe(p)} |")
    rows.append(f"| stock bf16 (for reference) | {gb(base)} | 100% | no quantization |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--families" in sys.argv:
        print(families_markdown())
    elif "--markdown" in sys.argv:
        print(markdown_table())
    else:
        sizes = preset_bytes()
        for k in ("bf16", *PRESET_ORDER, *LR_PRESETS):
            print(f"{k:8s} {sizes[k] / 1e9:6.2f} GB  {sizes[k] / 2**30:6.2f} GiB  {sizes[k] / sizes['bf16']:.0%}")
