"""Seeded random weights of a supported family's transformer, as a stock-format file ComfyUI's loaders detect.

    COMFYUI_PATH=/path/to/ComfyUI python bench/family_weights.py chroma /tmp/chroma-random.safetensors
    COMFYUI_PATH=/path/to/ComfyUI python bench/family_weights.py flux2_klein4b out.safetensors --tiny
    ... --cond cond.safetensors --tokens 512    # also conditioning tensors of the family's text width

An existing OUT is kept (only --cond is written then).

Full size: ComfyUI's own model class with the real model's configuration (docs/preset_memory.py FAMILY_CONFIGS),
built on the meta device; every tensor is drawn on the GPU when there is one and written as it is made, so a 20B
model needs no more host memory than its largest tensor. `--tiny`: the small instances of tests/tiny_families.py
(only for families whose sizes ComfyUI reads from the file: see TINY_DETECTABLE). For the server harness
(bench/server_bench.py --family); benchmark weights only, no quality meaning.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for sub in ("", "docs", "tests"):
    sys.path.insert(0, os.path.join(REPO, sub))

# harness family -> (FAMILY_CONFIGS label, tests/tiny_families.FAMILIES key)
FAMILIES = {
    "flux2_dev": ("FLUX.2 [dev] (32B)", "flux2"),
    "flux2_klein9b": ("FLUX.2 [klein] 9B", "flux2_klein"),
    "flux2_klein4b": ("FLUX.2 [klein] 4B", "flux2_klein"),
    "chroma": ("Chroma (8.9B)", "chroma"),
    "qwen_image": ("Qwen-Image (20B)", "qwen_image"),
    "wan14b": ("Wan 2.1 / 2.2 14B (per expert)", "wan"),
}
# ComfyUI's detection fixes Chroma's and Qwen-Image's sizes to the real models' (tests/tiny_families.py says which),
# so a server can run a tiny instance only of these
TINY_DETECTABLE = ("flux2_dev", "flux2_klein9b", "flux2_klein4b", "wan14b")


def model_and_config(family: str, tiny: bool):
    """(ComfyUI class, constructor arguments, image_model) of the family at full or tiny size."""
    import importlib
    import preset_memory
    label, tiny_key = FAMILIES[family]
    preset_memory._comfy_class("comfy.ops.disable_weight_init")  # ComfyUI on the path, CPU-only, stubs in place
    if tiny:
        import tiny_families
        cls, cfg = tiny_families.FAMILIES[tiny_key][0]()
        return cls, cfg, cfg["image_model"]
    dotted, cfg = next((d, c) for lab, d, c in preset_memory.FAMILY_CONFIGS if lab == label)
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name), cfg, cfg["image_model"]


def init(name: str, shape: tuple, gen, device):
    """A weight ~ N(0, 1/fan_in) (modulation x 0.3, as bench/e2e_comfy.py does for FLUX.1), norms 1, the rest small.
    Chroma's approximator output x 0.1: random weights put its scales at O(1) (tests/tiny_families.py says why)."""
    import torch
    from tiny_families import is_norm
    if len(shape) >= 2 and name.endswith("weight"):
        t = torch.randn(shape, generator=gen, device=device) / math.sqrt(math.prod(shape[1:]))
        if "mod" in name or "adaLN" in name:
            t *= 0.3
    elif is_norm(name):
        return torch.ones(shape, device=device)
    else:
        t = 0.02 * torch.randn(shape, generator=gen, device=device)
    if name.startswith("distilled_guidance_layer.out_proj"):
        t *= 0.1
    return t


def context_width(family: str, tiny: bool = False) -> int:
    """The width of the text conditioning the family's model takes (its config, else its class's default)."""
    import inspect
    from tiny_families import CONTEXT_ARG
    cls, cfg, _ = model_and_config(family, tiny)
    arg = CONTEXT_ARG[FAMILIES[family][1]]
    return int(cfg[arg] if arg in cfg else inspect.signature(cls).parameters[arg].default)


def write_cond(family: str, path: str, tokens: int, tiny: bool = False, seed: int = 0) -> None:
    """Seeded conditioning [1, tokens, width] in place of the family's text encoder (no pooled vector: only FLUX.1
    has one)."""
    import torch
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    save_file({"cond": torch.randn(1, tokens, context_width(family, tiny), generator=gen)}, path)


def write(family: str, path: str, tiny: bool = False, seed: int = 0) -> None:
    import torch
    from convrot import families
    from convrot.checkpoint import StreamingWriter, TensorInfo
    cls, cfg, image_model = model_and_config(family, tiny)
    import comfy.ops
    with torch.device("meta"):
        model = cls(**cfg, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)
    fam = families.by_image_model(image_model)
    saved = fam.saved_name if fam is not None else (lambda k: k)
    shapes = {saved(k): tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    specs = {k: TensorInfo(torch.bfloat16, s) for k, s in shapes.items()}
    t0 = time.time()
    meta = {"note": f"seeded random {FAMILIES[family][0]}{' (tiny)' if tiny else ''} weights for benchmarks"}
    with StreamingWriter(path, specs, meta) as w:
        for k, s in shapes.items():
            w.write(k, init(k, s, gen, dev).to(torch.bfloat16))
    n = sum(math.prod(s) for s in shapes.values())
    print(f"wrote {path}: {family}{' (tiny)' if tiny else ''}, {n / 1e9:.2f}B parameters, "
          f"{os.path.getsize(path) / 1e9:.1f} GB in {time.time() - t0:.0f} s", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=sorted(FAMILIES))
    p.add_argument("out")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cond", default=None, help="also write conditioning tensors of the family's text width here")
    p.add_argument("--tokens", type=int, default=512, help="text tokens of --cond")
    a = p.parse_args(argv)
    if a.tiny and a.family not in TINY_DETECTABLE:
        p.error(f"--tiny {a.family}: ComfyUI's detection fixes this family's sizes to the real model's, so a server "
                f"cannot load a tiny instance; tiny runs: {', '.join(TINY_DETECTABLE)}")
    if not os.path.exists(a.out):
        write(a.family, a.out, a.tiny, a.seed)
    if a.cond:
        write_cond(a.family, a.cond, a.tokens, a.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
