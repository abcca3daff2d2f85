"""Tiny instances of the model families beyond FLUX.1, built with ComfyUI's own model classes (comfy/ldm/...).

Shared by tests/test_families.py (loading, quantizing and running each family) and tests/test_workflows.py (the
example workflows run headless with these as stand-ins for the real files). Needs ComfyUI importable (the tests
set it up through tests/comfy_env.py first).

ComfyUI's detection derives most sizes from the file's shapes but fixes a few to the real models' values: Chroma's
approximator (64 -> 5120 x 5 layers -> 3072) and text width (4096), Qwen-Image's width (24 heads of 128) and text
width (3584). A tiny instance needs them from its shapes, so `tiny_detect_unet_config` wraps `detect_unet_config`
to read them from the file; the family itself is still what ComfyUI's own rules detect.
"""
from __future__ import annotations

import torch

SEED = 0


def _flux2(guidance: bool):
    from comfy.ldm.flux.model import Flux
    # as comfy/model_detection.py configures image_model "flux2"; hidden 256 = 2 heads of 128
    return Flux, dict(image_model="flux2", in_channels=128, out_channels=128, vec_in_dim=None, context_in_dim=512,
                      hidden_size=256, mlp_ratio=3.0, num_heads=2, depth=2, depth_single_blocks=2,
                      axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False, guidance_embed=guidance,
                      txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                      default_ref_method="index", ref_index_scale=10.0)


def _chroma():
    from comfy.ldm.chroma.model import Chroma
    return Chroma, dict(image_model="chroma", in_channels=64, out_channels=64, context_in_dim=512, hidden_size=256,
                        mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=[16, 56, 56],
                        theta=10000, patch_size=2, qkv_bias=True, in_dim=64, out_dim=256, hidden_dim=512,
                        n_layers=2, txt_ids_dims=[], vec_in_dim=None)


def _qwen():
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel, dict(image_model="qwen_image", in_channels=64, out_channels=16,
                                             num_layers=2, attention_head_dim=128, num_attention_heads=2,
                                             joint_attention_dim=512)


def _wan():
    from comfy.ldm.wan.model import WanModel
    # ffn 640 is not a multiple of G = 256: its down projection must stay bf16 at G = 256 (and quantize at 64)
    return WanModel, dict(image_model="wan2.1", model_type="t2v", dim=256, ffn_dim=640, num_heads=2, num_layers=2,
                          in_dim=16, out_dim=16, text_dim=4096, freq_dim=256, patch_size=(1, 2, 2),
                          window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


# family -> (builder, image_model ComfyUI must detect, latent shape, context width, guidance in the call)
FAMILIES = {
    "flux2": (lambda: _flux2(True), "flux2", (1, 128, 8, 8), 512, 3.5),
    "flux2_klein": (lambda: _flux2(False), "flux2", (1, 128, 8, 8), 512, None),
    "chroma": (_chroma, "chroma", (1, 16, 16, 16), 512, 0.0),
    "qwen_image": (_qwen, "qwen_image", (1, 16, 1, 16, 16), 512, None),
    "wan": (_wan, "wan2.1", (1, 16, 1, 16, 16), 4096, None),
}
ENGINE_FAMILY = {"flux2": "flux2", "flux2_klein": "flux2", "chroma": "chroma", "qwen_image": "qwen_image",
                 "wan": "wan"}
# the constructor argument that sets each family's text (conditioning) width
CONTEXT_ARG = {"flux2": "context_in_dim", "flux2_klein": "context_in_dim", "chroma": "context_in_dim",
               "qwen_image": "joint_attention_dim", "wan": "text_dim"}


def is_norm(name: str) -> bool:
    """A norm's weight or scale (set to 1 in random models), by the names ComfyUI's classes of these families use."""
    return name.endswith(("norm.weight", "norm.scale")) or ".norms." in name or "_norm" in name \
        or name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight", "norm_added_k.weight",
                          "norm3.weight"))


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            elif is_norm(name):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        # Random weights make Chroma's approximator put out scales of O(1), so (1 + scale) amplifies every
        # quantization error several times over; a trained model's modulations are far smaller. Scaled to ~0.1.
        if hasattr(model, "distilled_guidance_layer"):
            model.distilled_guidance_layer.out_proj.weight.mul_(0.1)
            model.distilled_guidance_layer.out_proj.bias.mul_(0.1)


def tiny_state_dict(family: str, pack, context_dim: int | None = None, seed: int = SEED) -> dict:
    """A stock-format state dict of a tiny instance of the family, bf16. `context_dim`: the text width (default
    FAMILIES' own, 512 or 4096), e.g. a real text encoder's width for the workflow runs."""
    import comfy.ops
    cls, cfg = FAMILIES[family][0]()
    if context_dim is not None:
        cfg = dict(cfg, **{CONTEXT_ARG[family]: context_dim})
    model = cls(**cfg, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init)
    _randomize(model, seed)
    fam = pack.convrot.families.by_image_model(FAMILIES[family][1])
    name = fam.saved_name if fam is not None else (lambda k: k)
    return {name(k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def tiny_detect_unet_config(orig):
    """`comfy.model_detection.detect_unet_config` reading Chroma's and Qwen-Image's fixed sizes from the file."""
    import comfy.model_detection as md

    def detect(state_dict, key_prefix, metadata=None):
        cfg = orig(state_dict, key_prefix, metadata=metadata)
        p = key_prefix
        if cfg and cfg.get("image_model") == "chroma":
            cfg["hidden_dim"], cfg["in_dim"] = state_dict[f"{p}distilled_guidance_layer.in_proj.weight"].shape
            cfg["out_dim"] = state_dict[f"{p}distilled_guidance_layer.out_proj.weight"].shape[0]
            cfg["n_layers"] = md.count_blocks(state_dict, f"{p}distilled_guidance_layer.layers." + "{}.")
            cfg["context_in_dim"] = state_dict[f"{p}txt_in.weight"].shape[1]
        if cfg and cfg.get("image_model") == "qwen_image":
            cfg["num_attention_heads"] = state_dict[f"{p}img_in.weight"].shape[0] // 128
            cfg["joint_attention_dim"] = state_dict[f"{p}txt_in.weight"].shape[1]
        return cfg

    detect.convrot_tiny = True
    return detect
