"""Transformer weight memory of each ConvRot preset for a FLUX.1 model, derived from the engine's own layer policy.

    python docs/preset_memory.py            # table for FLUX.1-dev / schnell / Kontext (same shapes)
    python docs/preset_memory.py --markdown # the same as a Markdown table (pasted into web/docs and the README)

Shapes come from `convrot.flux.FluxConfig()` (hidden 3072, 19 double + 38 single blocks), built on the meta device,
so nothing is allocated. Per linear layer, with `LayerPolicy(preset).action(name)`:
  bf16 = 2 bytes/weight; W4A4 = 0.5 byte/weight + 4 bytes (fp32 scale) per output channel;
  W8A8 = 1 byte/weight + 4 bytes per output channel. Biases, norms and every non-linear tensor stay bf16.
Activations, text encoders and VAE are not included: this is the size of the transformer file / its weights in VRAM.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from convrot.demo import projected_bytes  # noqa: E402
from convrot.flux import FluxConfig  # noqa: E402
from convrot.policy import PRESETS  # noqa: E402

PRESET_ORDER = ("mixed", "w4a4", "compact", "w8a8")


def preset_bytes(cfg: FluxConfig | None = None) -> dict[str, int]:
    """Bytes of all transformer weights per preset, plus the bf16 baseline under the key "bf16"."""
    cfg = cfg or FluxConfig()
    out = {}
    for preset in PRESET_ORDER:
        out[preset], out["bf16"] = projected_bytes(cfg, preset)
    return out


def gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def markdown_table(cfg: FluxConfig | None = None) -> str:
    sizes = preset_bytes(cfg)
    base = sizes["bf16"]
    rows = ["| preset | transformer weights (FLUX.1-dev, 12B) | vs bf16 | what it does |",
            "|---|---|---|---|"]
    for p in PRESET_ORDER:
        default = " (default)" if p == "mixed" else ""
        rows.append(f"| `{p}`{default} | {gb(sizes[p])} | {sizes[p] / base:.0%} | {PRESETS[p]} |")
    rows.append(f"| stock bf16 (for reference) | {gb(base)} | 100% | no quantization |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_table())
    else:
        sizes = preset_bytes()
        for k in ("bf16", *PRESET_ORDER):
            print(f"{k:8s} {sizes[k] / 1e9:6.2f} GB  {sizes[k] / 2**30:6.2f} GiB  {sizes[k] / sizes['bf16']:.0%}")
