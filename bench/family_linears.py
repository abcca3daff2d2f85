"""Per-linear timings for the layer shapes of each supported family, weighted by how often a step runs them.

    COMFYUI_PATH=/path/to/ComfyUI python bench/family_linears.py            # the shapes and counts, no GPU needed
    COMFYUI_PATH=/path/to/ComfyUI python bench/family_linears.py --run      # + `python -m convrot bench` on them

Each family's real model (docs/preset_memory.py FAMILY_CONFIGS: the sizes ComfyUI's detection builds) is built on
the meta device and planned with the `mixed` preset; every W4A4/W8A8 layer's (K, N) is paired with the number of
tokens it sees in one step at the family's usual size (TOKENS; which stream a layer belongs to is read from its
name, STREAM_RULES), so a row is (M, K, N) x count. With --run, the W4A4 rows are timed by `python -m convrot bench`
(cold L2, against cuBLAS bf16 in the same run) and each family gets its step's linear time, ConvRot vs bf16:
sum(count x time) over its W4A4 layers (W8A8 layers, which `mixed` keeps for modulation and attention outputs, are
listed but not timed by that bench).
"""
from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "docs"))

# tokens per stream at the size users run: FLUX.2/Chroma/Qwen-Image at 1024x1024 (4096 latent patches), text 512;
# Wan 14B text-to-video at 832x480, 81 frames (21 latent frames of 30 x 52 patches), text 512; modulation: 1
TOKENS = {
    "flux2": {"img": 4096, "txt": 512},
    "chroma": {"img": 4096, "txt": 512},
    "qwen_image": {"img": 4096, "txt": 512},
    "wan": {"img": 32760, "txt": 512},
}
# (glob on the layer name, stream or a fixed token count); first match wins; no match: img + txt (single stream)
STREAM_RULES = (
    ("distilled_guidance_layer.*", 344),  # Chroma's approximator: one row per modulation index (mod_index_length)
    ("*_mod.*", "one"), ("*modulation*", "one"), ("*adaLN*", "one"),
    ("*img_*", "img"), ("*txt_*", "txt"),
    ("*.attn.to_q", "img"), ("*.attn.to_k", "img"), ("*.attn.to_v", "img"), ("*.attn.to_out.*", "img"),
    ("*.attn.add_*", "txt"), ("*.attn.to_add_out", "txt"),
    ("*.cross_attn.k", "txt"), ("*.cross_attn.v", "txt"),
    ("blocks.*", "img"),  # Wan: self-attention, cross-attention queries/outputs and the FFN see the video tokens
)


def tokens_for(name: str, key: str) -> int:
    t = TOKENS[key]
    for pattern, stream in STREAM_RULES:
        if fnmatch.fnmatchcase(name, pattern):
            return stream if isinstance(stream, int) else 1 if stream == "one" else t[stream]
    return t["img"] + t["txt"]


def family_rows(label: str, dotted: str, config: dict, group_size: int = 256) -> tuple[str, collections.Counter]:
    """(family key, Counter of (action, M, K, N)) for one FAMILY_CONFIGS entry."""
    import torch
    import preset_memory
    from convrot.checkpoint import TensorInfo
    from convrot.convert import detect_family, plan_tensors
    cls = preset_memory._comfy_class(dotted)
    import comfy.ops
    with torch.device("meta"):
        model = cls(**config, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)
    infos = {k: TensorInfo(torch.bfloat16, tuple(v.shape)) for k, v in model.state_dict().items()}
    family = detect_family(infos, config["image_model"])
    key = family.name
    plan = plan_tensors(infos, {}, config["image_model"], group_size, "mixed", family=family.name)
    rows: collections.Counter = collections.Counter()
    for layer, action in plan.actions.items():
        if action not in ("w4a4", "w8a8"):
            continue
        n, k = infos[layer + ".weight"].shape
        rows[(action, tokens_for(layer, key), k, n)] += 1
    return key, rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="time the W4A4 shapes with `python -m convrot bench` (GPU)")
    p.add_argument("--only", default=None, help="comma-separated substrings of family labels to keep")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    import preset_memory
    families = [f for f in preset_memory.FAMILY_CONFIGS
                if args.only is None or any(s.lower() in f[0].lower() for s in args.only.split(","))]
    plans = []
    for label, dotted, config in families:
        key, rows = family_rows(label, dotted, config)
        plans.append((label, rows))
        print(f"## {label} ({key}): {sum(rows.values())} quantized layers")
        for (action, m, k, n), c in sorted(rows.items()):
            print(f"   {action}  M={m:>6} K={k:>6} N={n:>6}  x{c}")
    if not args.run:
        return 0
    from convrot import bench
    shapes = sorted({(m, k, n) for _, rows in plans for (a, m, k, n) in rows if a == "w4a4" and m > 1})
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        rc = bench.main(["--shapes", ";".join(f"{m},{k},{n}" for m, k, n in shapes), "--no-kitchen",
                         "--iters", str(args.iters), "--json", out])
        if rc:
            return rc
        with open(out, encoding="utf-8") as f:
            timed = {(r["M"], r["K"], r["N"]): r for r in json.load(f)["rows"]}
    print("\n| family | W4A4 layers timed | bf16 ms per step | ConvRot ms per step | ConvRot vs bf16 |")
    print("|---|---|---|---|---|")
    for label, rows in plans:
        bf = ours = 0.0
        n = 0
        for (a, m, k, nn), c in rows.items():
            r = timed.get((m, k, nn))
            if a == "w4a4" and r is not None:
                bf += c * r["bf16_us"] / 1e3
                ours += c * r["ours_us"] / 1e3
                n += c
        if n:
            print(f"| {label} | {n} | {bf:.1f} | {ours:.1f} | {bf / ours:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
