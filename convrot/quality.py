"""`python -m convrot quality [FILE]`: how much each preset perturbs a FLUX transformer, layer by layer and end to end.

Per layer: every nn.Linear's inputs are captured with forward hooks while the bf16 model denoises; each layer is
then run on those same inputs in bf16, W8A8 and W4A4 (ConvRot reference math, bit-identical to ConvRotLinear on CPU)
and compared with an fp32 computation from the same bf16 weights and inputs:
    relative error = ||y - y_fp32||_F / ||y_fp32||_F   over all captured rows of the layer.
A preset's error for a layer is that of the action the preset picks for it (0 where it keeps the layer bf16).

End to end: the same noise is denoised N steps (Euler flow matching, sigmas 1 -> 0) by the bf16 model and by a copy
quantized with each preset; the final latents are compared (relative error and PSNR over the bf16 latent's range).

Random weights have none of the activation outliers of a trained DiT, and outliers are what ConvRot exists for. So on
the seeded model the per-layer table is measured, by default, on captured activations with DiT-like outliers injected
(a few channels scaled up, a few token rows shifted by a large common offset); the output says which mode was used.
The end-to-end rows always run the unmodified model.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import reference
from .flux import Flux, FluxConfig, example_inputs, random_flux
from .policy import BF16, W4A4, W8A8, LayerPolicy, count_blocks, strip_prefix
from .linear import ConvRotLinear
from .quantizer import quantize_model

PRESET_ORDER = ("mixed", "w4a4", "compact", "w8a8")
BLOCK_TYPES = ("double attn", "double mlp", "single", "modulation", "embed/final")
BLOCK_TYPE_HELP = {
    "double attn": "double_blocks.*.{img,txt}_attn.{qkv,proj}",
    "double mlp": "double_blocks.*.{img,txt}_mlp.{0,2}",
    "single": "single_blocks.*.linear1, single_blocks.*.linear2",
    "modulation": "double_blocks.*.{img,txt}_mod.lin, single_blocks.*.modulation.lin",
    "embed/final": "img_in, txt_in, time_in, vector_in, guidance_in, final_layer (bf16 under every preset)",
}
# Where ComfyUI's FLUX loader and the project expect trained weights to appear (see ../shared/README.md).
SHARED_WEIGHTS = Path(__file__).resolve().parents[2] / "shared" / "weights"


def block_type(name: str) -> str:
    n = strip_prefix(name)
    if n.startswith("double_blocks."):
        if "_mod." in n:
            return "modulation"
        return "double attn" if "_attn." in n else "double mlp"
    if n.startswith("single_blocks."):
        return "modulation" if ".modulation." in n else "single"
    return "embed/final"


# ------------------------------------------------------------------------------------------------ outliers

@dataclass
class OutlierSpec:
    """DiT-like outliers added to a [tokens, channels] activation matrix (relative to its own RMS).

    channel_frac of the channels (at least one) are multiplied by channel_gain: the column-wise outliers that
    per-token quantization handles worst without rotation. row_frac of the tokens (at least one, only where there
    are >= min_rows tokens) get a common offset of row_offset x RMS added to every channel, with a random sign per
    token: the row-wise "massive activation" outliers the ConvRot paper targets, which a Sylvester Hadamard funnels
    into one channel and a regular Hadamard spreads evenly.
    """
    channel_frac: float = 0.01
    channel_gain: float = 20.0
    row_frac: float = 0.02
    row_offset: float = 10.0
    min_rows: int = 16

    def describe(self) -> str:
        return (f"{self.channel_frac:.0%} of channels x{self.channel_gain:g}; {self.row_frac:.0%} of token rows "
                f"+/-{self.row_offset:g} x RMS common offset (rows only where a layer sees >= {self.min_rows} tokens)")


def inject_outliers(x: torch.Tensor, spec: OutlierSpec, seed: int = 0) -> torch.Tensor:
    """x [M, K] -> a copy with DiT-like channel and row outliers (fp32 math, returned in x's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    xf = x.to(torch.float32).clone()
    m, k = xf.shape
    rms = xf.pow(2).mean().sqrt().clamp_min(1e-6)
    n_ch = max(1, round(spec.channel_frac * k))
    ch = torch.randperm(k, generator=gen)[:n_ch]
    xf[:, ch] *= spec.channel_gain
    if m >= spec.min_rows and spec.row_frac > 0:
        n_rows = max(1, round(spec.row_frac * m))
        rows = torch.randperm(m, generator=gen)[:n_rows]
        sign = torch.randint(0, 2, (n_rows, 1), generator=gen).to(torch.float32) * 2 - 1
        xf[rows] += sign * spec.row_offset * rms
    return xf.to(x.dtype)


def dit_like_activations(m: int, k: int, seed: int = 0, spec: OutlierSpec | None = None,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Gaussian [m, k] activations with DiT-like channel and row outliers (for tests and demos)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    return inject_outliers(x, spec or OutlierSpec(), seed + 1).to(dtype)


# ------------------------------------------------------------------------------------------------ per layer

def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float32)
    return float((y.to(torch.float32) - ref).norm() / ref.norm().clamp_min(1e-30))


def quantized_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int,
                     bits: int) -> torch.Tensor:
    """What a ConvRotLinear built from `weight` returns for x (the reference path), as fp32."""
    w_q, w_s = reference.rotate_quantize(weight, group_size, bits)
    a_q, a_s = reference.rotate_quantize(x, group_size, bits)
    return reference.quantized_gemm(a_q, a_s, w_q, w_s, bias, torch.float32, bits)


def unrotated_w4a4_output(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Plain per-token / per-channel symmetric int4 with no rotation: what ConvRot's rotation is measured against."""
    a, sa = reference.quantize_rows(x, 4)
    w, sw = reference.quantize_rows(weight, 4)
    out = reference.int_matmul(a, w) * sa.unsqueeze(-1) * sw
    return out + bias.to(torch.float32) if bias is not None else out


def layer_errors(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> dict:
    """Relative output error of one layer on inputs x [M, K] for each way of running it."""
    ref = F.linear(x.float(), weight.float(), bias.float() if bias is not None else None)
    out = {"bf16": rel_err(F.linear(x.to(torch.bfloat16), weight.to(torch.bfloat16),
                                    bias.to(torch.bfloat16) if bias is not None else None), ref),
           "w4a4_norot": rel_err(unrotated_w4a4_output(x, weight, bias), ref)}
    if x.shape[-1] % group_size == 0:
        out[W8A8] = rel_err(quantized_output(x, weight, bias, group_size, 8), ref)
        out[W4A4] = rel_err(quantized_output(x, weight, bias, group_size, 4), ref)
    return out


@torch.no_grad()
def capture_inputs(model: nn.Module, run, rows_per_call: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run `run()` with a forward hook on every nn.Linear; return each layer's inputs as [rows, in_features] on CPU.

    rows_per_call > 0 keeps a seeded random sample of that many token rows from each call (bounds the memory on
    full-size models); calls with fewer rows (modulation: one row per image) are kept whole."""
    store: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            def hook(m, args, _out, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1])
                if rows_per_call and x.shape[0] > rows_per_call:
                    calls = len(store.get(name, ()))
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()) + calls)
                    x = x[torch.randperm(x.shape[0], generator=gen)[:rows_per_call].to(x.device)]
                store.setdefault(name, []).append(x.cpu())
            hooks.append(mod.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return {k: torch.cat(v) for k, v in store.items()}


def per_layer_report(model: nn.Module, inputs: dict[str, torch.Tensor], group_size: int,
                     outliers: OutlierSpec | None, presets=PRESET_ORDER, max_rows: int = 0) -> list[dict]:
    """One row per captured linear layer. max_rows > 0 keeps that many captured token rows per layer (a seeded
    random sample, taken before outliers are injected) to bound the time on big models."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    policies = {p: LayerPolicy.for_names([f"{n}.weight" for n in names], p) for p in presets}
    rows = []
    for name in names:
        if name not in inputs:
            continue
        mod = model.get_submodule(name)
        x = inputs[name]
        if max_rows and x.shape[0] > max_rows:
            x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))[:max_rows]]
        if outliers is not None:
            x = inject_outliers(x, outliers, zlib.crc32(name.encode()))
        x = x.to(mod.weight.device)
        errs = layer_errors(x, mod.weight.data, mod.bias.data if mod.bias is not None else None, group_size)
        row = {"layer": name, "type": block_type(name), "rows": x.shape[0], "in": mod.in_features,
               "out": mod.out_features, "bf16": errs["bf16"], "w4a4_norot": errs["w4a4_norot"],
               "w4a4_layer": errs.get(W4A4), "w8a8_layer": errs.get(W8A8), "actions": {}, "preset_err": {}}
        for p, pol in policies.items():
            act = pol.action(name)
            if act != BF16 and act not in errs:  # in_features not a multiple of G: stays bf16, as quantize_model does
                act = BF16
            row["actions"][p] = act
            row["preset_err"][p] = errs["bf16"] if act == BF16 else errs[act]
        rows.append(row)
    return rows


def summarize(rows: list[dict], presets=PRESET_ORDER) -> dict[str, dict]:
    """Per block type: layer count and mean / max relative error for bf16, unrotated W4A4 and each preset."""
    out = {}
    for t in BLOCK_TYPES:
        sel = [r for r in rows if r["type"] == t]
        if not sel:
            continue
        cols = {"bf16": [r["bf16"] for r in sel], "w4a4_norot": [r["w4a4_norot"] for r in sel]}
        cols.update({p: [r["preset_err"][p] for r in sel] for p in presets})
        out[t] = {"layers": len(sel), **{c: {"mean": sum(v) / len(v), "max": max(v)} for c, v in cols.items()}}
    return out


# ------------------------------------------------------------------------------------------------ end to end

def sigmas(steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, steps + 1)


@torch.no_grad()
def denoise(model: Flux, inputs: dict, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler flow matching: x <- x + (s_next - s) * v(x, s), from pure noise at sigma 1 down to sigma 0."""
    x = noise.clone()
    sig = sigmas(steps)
    batch = x.shape[0]
    for i in range(steps):
        t = torch.full((batch,), float(sig[i]), device=x.device)
        v = model(x, inputs["img_ids"], inputs["txt"], inputs["txt_ids"], t, inputs["y"], inputs["guidance"])
        x = (x.float() + (sig[i + 1] - sig[i]) * v.float()).to(x.dtype)
    return x


class CachedCodesLinear(nn.Module):
    """CPU stand-in for a ConvRotLinear that unpacks its weight codes once instead of on every call.

    Same arithmetic, same order, as ConvRotLinear.forward on the reference path (rotate in fp32, per-row codes,
    exact integer GEMM in fp32 or fp64 by the same bound, acc * a_scale * w_scale + bias, cast): outputs are
    bit-identical (tests/test_quality.py checks it). It only saves the per-call int4 unpack of the weight, which
    dominates the reference path's time on CPU.
    """

    def __init__(self, q: ConvRotLinear):
        super().__init__()
        self.group_size, self.bits, self.out_features = q.group_size, q.bits, q.out_features
        codes = reference.codes_of(q.weight, q.bits)
        self.w_amax = int(codes.abs().max().clamp_min(1)) if codes.numel() else 0
        self.w32 = codes.to(torch.float32)
        self.w64 = None
        self.w_scale = q.weight_scale.to(torch.float32)
        self.bias = q.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, x.shape[-1])
        a, a_scale = reference.quantize_rows(reference.rotate(x2d, self.group_size), self.bits)
        bound = int(a.abs().max().clamp_min(1)) * self.w_amax * a.shape[-1] if a.numel() else 0
        if bound < 2**24:
            acc = (a.to(torch.float32) @ self.w32.t()).to(torch.float32)
        else:
            if self.w64 is None:
                self.w64 = self.w32.to(torch.float64)
            acc = (a.to(torch.float64) @ self.w64.t()).to(torch.float32)
        out = acc * a_scale.to(torch.float32).unsqueeze(-1) * self.w_scale
        if self.bias is not None:
            out = out + self.bias.to(torch.float32)
        return out.to(x.dtype).reshape(*lead, self.out_features)


def use_cached_codes(model: nn.Module) -> int:
    """Swap every CPU ConvRotLinear of `model` for a CachedCodesLinear, in place; returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, ConvRotLinear) and mod.weight.device.type == "cpu":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, CachedCodesLinear(mod))
            n += 1
    return n


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range (max - min) as the peak."""
    ref = ref.float()
    mse = float((x.float() - ref).pow(2).mean())
    peak = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def linear_bytes(model: nn.Module, plan: dict[str, str]) -> int:
    """Bytes of all linear weights (+fp32 scales) under a plan {layer: action}; biases excluded."""
    total = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            act = plan.get(n, BF16)
            o, i = m.out_features, m.in_features
            total += o * i * 2 if act == BF16 else (o * i // 2 if act == W4A4 else o * i) + 4 * o
    return total


# ------------------------------------------------------------------------------------------------ models

def default_config() -> FluxConfig:
    """Small but not tiny: hidden 512 (4 heads of 128), MLP 2048, 4 double + 4 single blocks."""
    return FluxConfig.tiny(hidden=512, depth=4, single=4)


def config_from_state_dict(shapes: dict[str, tuple]) -> FluxConfig:
    """A FluxConfig from the tensor shapes of a FLUX state dict (names without the checkpoint prefix)."""
    def s(k):
        if k not in shapes:
            raise ValueError(f"not a FLUX.1 transformer: missing {k}")
        return shapes[k]
    hidden, in_ch = s("img_in.weight")
    head_dim = s("double_blocks.0.img_attn.norm.query_norm.scale")[0]
    if head_dim == 128:
        axes = [16, 56, 56]
    else:  # keep FLUX's proportions; every axis needs an even size
        a = (head_dim * 7 // 16) // 2 * 2
        axes = [head_dim - 2 * a, a, a]
    return FluxConfig(in_channels=in_ch, vec_in_dim=s("vector_in.in_layer.weight")[1],
                      context_in_dim=s("txt_in.weight")[1], hidden_size=hidden,
                      mlp_ratio=s("double_blocks.0.img_mlp.0.weight")[0] / hidden, num_heads=hidden // head_dim,
                      depth=count_blocks(shapes, "double_blocks"), depth_single_blocks=count_blocks(shapes, "single_blocks"),
                      axes_dim=axes, guidance_embed="guidance_in.in_layer.weight" in shapes)


def load_flux_file(path: str, dtype: torch.dtype = torch.bfloat16) -> Flux:
    """A FLUX.1 safetensors file in ComfyUI naming (any of the usual prefixes) as a convrot.flux.Flux in bf16."""
    from safetensors import safe_open

    from .checkpoint import float_weight, layer_getter, read_header

    infos, _meta = read_header(path)
    if any(k.endswith(".comfy_quant") for k in infos):
        raise ValueError(f"{path}: already quantized; the quality report needs the float (bf16/fp16/fp32/fp8) source")
    keys = {strip_prefix(k): k for k in infos}
    cfg = config_from_state_dict({k: tuple(infos[v].shape) for k, v in keys.items()})
    with torch.device("meta"):
        model = Flux(cfg)
    wanted = model.state_dict().keys()
    missing = [k for k in wanted if k not in keys]
    if missing:
        raise ValueError(f"{path}: FLUX tensors missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    sd = {}
    with safe_open(path, framework="pt") as f:
        for k in wanted:
            src = keys[k]
            t = (float_weight(layer_getter(f, infos, src[: -len(".weight")])) if k.endswith(".weight")
                 else f.get_tensor(src))
            sd[k] = t.to(dtype)
    model.load_state_dict(sd, assign=True)
    return model.eval()


def find_shared_weights(folder: Path | None = None) -> list[Path]:
    """FLUX transformer files in ../shared/weights/ (smallest first); [] when the folder or such files are absent."""
    folder = Path(folder or SHARED_WEIGHTS)
    if not folder.is_dir():
        return []
    from .convert import read_header
    from .families import FLUX_MARKERS
    found = []
    for p in sorted(folder.rglob("*.safetensors")):
        try:
            names = {strip_prefix(k) for k in read_header(str(p))[0]}
        except Exception:
            continue
        if all(m in names for m in FLUX_MARKERS):
            found.append(p)
    return sorted(found, key=lambda p: p.stat().st_size)


# ------------------------------------------------------------------------------------------------ report

def run_quality(model: Flux, *, steps: int = 4, height: int = 32, width: int = 32, txt_len: int = 64,
                group_size: int = 256, seed: int = 0, outliers: OutlierSpec | None = None,
                presets=PRESET_ORDER, model_desc: str = "", max_rows: int = 512, progress=None) -> dict:
    say = progress or (lambda msg: None)
    cfg = model.cfg
    model = model.eval()
    device = next(model.parameters()).device
    inputs = example_inputs(cfg, height=height, width=width, txt_len=txt_len, seed=seed, device=device)
    noise = inputs["img"]
    t0 = time.perf_counter()
    latents = {}
    per_call = -(-max_rows // steps) if max_rows else 0
    captured = capture_inputs(model, lambda: latents.__setitem__("bf16", denoise(model, inputs, noise, steps)),
                              per_call, seed)
    say(f"bf16: {steps} steps, inputs of {len(captured)} linear layers captured ({time.perf_counter() - t0:.1f}s)")
    t1 = time.perf_counter()
    rows = per_layer_report(model, captured, group_size, outliers, presets, max_rows)
    del captured
    say(f"per-layer errors: {len(rows)} layers ({time.perf_counter() - t1:.1f}s)")
    e2e = [{"preset": "bf16", "w4a4_layers": 0, "w8a8_layers": 0,
            "linear_bytes": linear_bytes(model, {}), "rel_err": 0.0, "psnr_db": math.inf}]
    ref = latents["bf16"]
    for p in presets:
        t2 = time.perf_counter()
        qm = copy.deepcopy(model)
        names = [f"{n}.weight" for n, m in qm.named_modules() if isinstance(m, nn.Linear)]
        plan = quantize_model(qm, group_size, LayerPolicy.for_names(names, p))
        use_cached_codes(qm)  # CPU only; on CUDA the ConvRotLinear layers (and their kernels) run as they are
        out = denoise(qm, inputs, noise, steps)
        del qm
        acts = list(plan.values())
        e2e.append({"preset": p, "w4a4_layers": acts.count(W4A4), "w8a8_layers": acts.count(W8A8),
                    "linear_bytes": linear_bytes(model, plan), "rel_err": rel_err(out, ref), "psnr_db": psnr(out, ref)})
        say(f"{p}: end to end ({time.perf_counter() - t2:.1f}s)")
    tokens = (height // 2) * (width // 2)
    return {
        "model": model_desc,
        "config": {"hidden": cfg.hidden_size, "mlp": int(cfg.hidden_size * cfg.mlp_ratio), "heads": cfg.num_heads,
                   "double_blocks": cfg.depth, "single_blocks": cfg.depth_single_blocks},
        "group_size": group_size, "steps": steps, "seed": seed, "max_rows": max_rows,
        "image_tokens": tokens, "text_tokens": txt_len, "latent": f"{height}x{width}",
        "outliers": "none" if outliers is None else {"mode": "dit", **asdict(outliers)},
        "outlier_desc": "none (activations as captured)" if outliers is None else "DiT-like outliers injected into the "
                        "captured activations: " + outliers.describe(),
        "presets": list(presets),
        "summary": summarize(rows, presets), "layers": rows, "end_to_end": e2e,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def to_markdown(rep: dict, per_layer: bool = False) -> str:
    presets = rep["presets"]
    c = rep["config"]
    lines = [
        "## ConvRot quality report", "",
        f"- model: {rep['model']} (hidden {c['hidden']}, MLP {c['mlp']}, {c['heads']} heads, "
        f"{c['double_blocks']} double + {c['single_blocks']} single blocks)",
        f"- group size {rep['group_size']}; latent {rep['latent']} ({rep['image_tokens']} image + "
        f"{rep['text_tokens']} text tokens); {rep['steps']} Euler steps; seed {rep['seed']}",
        f"- per-layer inputs: captured with forward hooks on every nn.Linear during the bf16 model's {rep['steps']} "
        f"sampler steps" + (f" (at most {rep['max_rows']} random token rows per layer)" if rep["max_rows"] else ""),
        f"- outlier mode: **{'dit' if rep['outliers'] != 'none' else 'none'}** — {rep['outlier_desc']}",
        "",
        "### Per-layer relative output error, by block type",
        "",
        "||y - y_fp32||_F / ||y_fp32||_F per layer, against fp32 math on the same bf16 weights and inputs; "
        "cells are mean / max over the layers of that type. A preset's cell uses the action it picks per layer "
        "(a layer it keeps bf16 counts with the bf16 error). `bf16` = the unquantized layer; "
        "`w4a4 no-rot` = plain int4 per-token/per-channel without the Hadamard rotation, for scale.",
        "",
        "| block type | layers | bf16 | w4a4 no-rot | " + " | ".join(presets) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(presets),
    ]
    for t, s in rep["summary"].items():
        cells = [f"{_pct(s[k]['mean'])} / {_pct(s[k]['max'])}" for k in ("bf16", "w4a4_norot", *presets)]
        lines.append(f"| {t} | {s['layers']} | " + " | ".join(cells) + " |")
    lines += ["", "Block types: " + "; ".join(f"{t} = {BLOCK_TYPE_HELP[t]}" for t in rep["summary"]), ""]
    lines += [
        f"### End to end: same noise, {rep['steps']} Euler flow-matching steps, final latent vs bf16"
        + (" (unmodified model: no injected outliers)" if rep["outliers"] != "none" else ""),
        "",
        "| preset | W4A4 layers | W8A8 layers | linear weights MiB | rel. error | PSNR dB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rep["end_to_end"]:
        p = "inf" if math.isinf(r["psnr_db"]) else f"{r['psnr_db']:.2f}"
        lines.append(f"| {r['preset']} | {r['w4a4_layers']} | {r['w8a8_layers']} | "
                     f"{r['linear_bytes'] / 2**20:.2f} | {_pct(r['rel_err'])} | {p} |")
    lines += ["", "PSNR uses the bf16 latent's range (max - min) as the peak.", ""]
    if per_layer:
        lines += ["### Every layer", "", "| layer | type | bf16 | w4a4 no-rot | " + " | ".join(presets) + " |",
                  "|---|---|---:|---:|" + "---:|" * len(presets)]
        for r in rep["layers"]:
            cells = [f"{_pct(r['preset_err'][p])} ({r['actions'][p]})" for p in presets]
            lines.append(f"| {r['layer']} | {r['type']} | {_pct(r['bf16'])} | {_pct(r['w4a4_norot'])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    lines.append(f"_{rep['seconds']} s_")
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    """Strict JSON: an infinite PSNR (identical latents) is written as null."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(rep), indent=1, allow_nan=False)


def save_png(rep: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["layers"] if r["type"] != "embed/final"]
    presets = rep["presets"]
    n = len(rows)
    width = 0.8 / len(presets)
    fig, ax = plt.subplots(figsize=(max(10, n * 0.28), 5))
    for i, p in enumerate(presets):
        xs = [j + (i - (len(presets) - 1) / 2) * width for j in range(n)]
        ax.bar(xs, [100 * max(r["preset_err"][p], 1e-6) for r in rows], width, label=p)
    ax.plot(range(n), [100 * r["w4a4_norot"] for r in rows], "kx", markersize=4, label="W4A4 without rotation")
    ax.set_yscale("log")
    ax.set_ylabel("relative output error (%)")
    ax.set_xticks(range(n))
    ax.set_xticklabels([r["layer"].replace("double_blocks.", "d").replace("single_blocks.", "s") for r in rows],
                       rotation=90, fontsize=6)
    mode = "DiT-like outliers injected" if rep["outliers"] != "none" else "activations as captured"
    ax.set_title(f"ConvRot per-layer error, G={rep['group_size']} ({rep['model']}; {mode})", fontsize=9, loc="left")
    ax.legend(fontsize=8, ncol=5, loc="lower right", bbox_to_anchor=(1.0, 1.06), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m convrot quality",
        description="Per-layer and end-to-end error of each ConvRot preset (mixed, w4a4, compact, w8a8) vs bf16.")
    ap.add_argument("file", nargs="?", help="FLUX.1 transformer .safetensors (ComfyUI naming; bf16/fp16/fp32/fp8). "
                    f"Default: the first FLUX file in {SHARED_WEIGHTS} when that folder exists, else a seeded "
                    "random FLUX-architecture model")
    ap.add_argument("--seeded", action="store_true", help="use the seeded random model even if shared weights exist")
    ap.add_argument("--hidden", type=int, default=512, help="seeded model: hidden size (multiple of 128)")
    ap.add_argument("--double", type=int, default=4, help="seeded model: double blocks")
    ap.add_argument("--single", type=int, default=4, help="seeded model: single blocks")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random model, the noise and the conditioning")
    ap.add_argument("--steps", type=int, default=4, help="Euler steps end to end (default 4)")
    ap.add_argument("--size", type=int, default=32, help="latent height = width in latent pixels (2x2 patches)")
    ap.add_argument("--txt-len", type=int, default=64, help="text tokens")
    ap.add_argument("--group-size", type=int, default=256, choices=(16, 64, 256))
    ap.add_argument("--presets", default=",".join(PRESET_ORDER), help="comma-separated presets to compare")
    ap.add_argument("--outliers", choices=("auto", "dit", "none"), default="auto",
                    help="per-layer table: inject DiT-like outliers into captured activations (dit) or not (none); "
                         "auto = dit for the seeded model, none for a file of trained weights")
    ap.add_argument("--channel-frac", type=float, default=OutlierSpec.channel_frac,
                    help="dit mode: fraction of channels made outliers (default %(default)s)")
    ap.add_argument("--channel-gain", type=float, default=OutlierSpec.channel_gain,
                    help="dit mode: factor on those channels (default %(default)s)")
    ap.add_argument("--row-frac", type=float, default=OutlierSpec.row_frac,
                    help="dit mode: fraction of token rows given a common offset (default %(default)s)")
    ap.add_argument("--row-offset", type=float, default=OutlierSpec.row_offset,
                    help="dit mode: that offset, in multiples of the activation RMS (default %(default)s)")
    ap.add_argument("--max-rows", type=int, default=512,
                    help="captured token rows per layer used for the per-layer table (0 = all)")
    ap.add_argument("--per-layer", action="store_true", help="also print every layer's row")
    ap.add_argument("--json", metavar="PATH", help="write the full report as JSON ('-' = stdout, instead of markdown)")
    ap.add_argument("--png", metavar="PATH", help="bar chart of per-layer error (needs matplotlib)")
    ap.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, ...); default cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "images":  # `python -m convrot quality images ...`: image-level report on the testbed
        return images_main(argv[1:])
    args = build_parser().parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(f"[quality] {m}", file=sys.stderr, flush=True))
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    for p in presets:
        LayerPolicy(p)  # raises on an unknown preset
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("quality: --png needs matplotlib (pip install matplotlib)", file=sys.stderr)
            return 2
    path = args.file
    if path is None and not args.seeded:
        shared = find_shared_weights()
        if shared:
            path = str(shared[0])
            say(f"using shared weights {path} (see {SHARED_WEIGHTS / 'README.md'}); --seeded to skip")
    try:
        if path:
            if not os.path.isfile(path):
                print(f"quality: no such file: {path}", file=sys.stderr)
                return 2
            say(f"loading {path}")
            model = load_flux_file(path).to(args.device)
            desc = f"{Path(path).name} (weights from file)"
            trained = True
        else:
            if args.hidden % 128 or args.hidden % args.group_size:
                print(f"quality: --hidden must be a multiple of 128 and of the group size {args.group_size}",
                      file=sys.stderr)
                return 2
            model = random_flux(FluxConfig.tiny(hidden=args.hidden, depth=args.double, single=args.single), args.seed,
                                device=args.device)
            desc = f"seeded random FLUX-architecture model (seed {args.seed})"
            trained = False
    except (ValueError, OSError) as e:
        print(f"quality: {e}", file=sys.stderr)
        return 2
    mode = args.outliers if args.outliers != "auto" else ("none" if trained else "dit")
    spec = OutlierSpec(args.channel_frac, args.channel_gain, args.row_frac, args.row_offset) if mode == "dit" else None
    rep = run_quality(model, steps=args.steps, height=args.size, width=args.size, txt_len=args.txt_len,
                      group_size=args.group_size, seed=args.seed, outliers=spec, presets=presets, model_desc=desc,
                      max_rows=args.max_rows, progress=say)
    if args.json == "-":
        print(to_json(rep))
    else:
        print(to_markdown(rep, args.per_layer))
        if args.json:
            Path(args.json).write_text(to_json(rep))
            say(f"wrote {args.json}")
    if args.png:
        save_png(rep, args.png)
        say(f"wrote {args.png}")
    return 0


# ================================================================================================ images (testbed)
#
# `python -m convrot quality images`: image-level quality on the trained CIFAR-10 testbed in ../shared/weights/
# (see its README): every variant samples the same noise with the testbed's exact sampler (Euler, t 1 -> 0, CFG
# against the empty-prompt row); the images are compared with bf16's (paired PSNR, SSIM), classified by a small CNN
# trained once on the CIFAR-10 train split (class accuracy), and their CNN features compared with the test split's
# (Fréchet distance, with bf16-from-other-seeds as its noise floor).

SHARED = Path(__file__).resolve().parents[2] / "shared"
TESTBED_FILE = "flux_cifar10.safetensors"
CONTEXT_FILE = "cifar10_context.safetensors"
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CACHE = Path(os.environ.get("CONVROT_CACHE", Path.home() / ".cache" / "convrot"))
CLASSIFIER_VERSION = 2
DEFAULT_VARIANTS = ("bf16", "bf16-seeds", "fp8", "w8a8", "mixed", "w4a4", "compact", "w4a4-norot", "comfy-kitchen",
                    "compact+lr", "w4a4+lr", "mixed+lr")  # +lr widest first: the narrower ones reuse its corrections
VARIANT_HELP = {
    "bf16": "the reference: bf16 weights",
    "bf16-seeds": "bf16 from other noise seeds (the noise floor of the distribution metrics; no pairing)",
    "fp8": "every linear weight cast to float8_e4m3fn (ComfyUI's fp8 weight dtype), computed at the compute dtype",
    "w4a4-norot": "plain round-to-nearest int4 per channel / per token, no rotation, on the w4a4 preset's layers",
    "comfy-kitchen": "comfy-kitchen's TensorCoreConvRotW4A4Layout quantization + its convrot_w4a4_linear, on the "
                     "w4a4 preset's layers",
    "+lr": "the preset with the calibration-free correction (convrot/correction.py) on its W4A4 layers",
    "+qattn": "any variant with the quantized attention (convrot/attention.py: INT8 Q/K per block, K smoothed, "
              "fp32 softmax, FP8 P·V; `+qattn-bf16pv`: 16-bit P·V), the reference on the CPU, the Triton kernel on "
              "a GPU that runs it (e.g. mixed+qattn, bf16+qattn)",
}


def split_attention(variant: str):
    """'mixed+qattn' -> ('mixed', QAttnConfig); a variant without an attention suffix -> (variant, None)."""
    from .attention import VARIANTS
    for name, cfg in sorted(VARIANTS.items(), key=lambda kv: -len(kv[0])):
        if variant.endswith("+" + name):
            return variant[: -len(name) - 1], cfg
    return variant, None


class quantized_attention:
    """While active, convrot.flux's attention runs the quantized attention of `cfg` (None: unchanged)."""

    def __init__(self, cfg):
        self.cfg, self.saved = cfg, None

    def __enter__(self):
        if self.cfg is None:
            return self
        from . import flux
        from .attention import reference_attention
        cfg = self.cfg

        def attn(q, k, v, pe):
            q, k = flux.apply_rope(q, pe), flux.apply_rope(k, pe)
            fast = None
            if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
                from . import triton_attention
                ok, _ = triton_attention.available(q.device, cfg=cfg)
                if ok:
                    fast = triton_attention.device_config(cfg, q.device)
            x = (triton_attention.attention(q, k, v, fast) if fast is not None
                 else reference_attention(q, k, v, cfg))
            return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)

        self.saved = flux.attention
        flux.attention = attn
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            from . import flux
            flux.attention = self.saved
            self.saved = None
        return False


def testbed_paths(shared: Path | None = None) -> tuple[Path, Path, Path] | None:
    """(weights file, context file, data folder) of the testbed, or None when any is absent."""
    shared = Path(shared or SHARED)
    w, c, d = shared / "weights" / TESTBED_FILE, shared / "weights" / CONTEXT_FILE, shared / "data"
    ok = w.is_file() and c.is_file() and (d / "cifar10_test_jpg.npz").is_file()
    return (w, c, d) if ok else None


def load_context(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file
    c = load_file(str(path))
    return c["txt"].float(), c["vec"].float()


def _unpatchify(x: torch.Tensor) -> torch.Tensor:  # B,256,12 -> B,3,32,32 (the testbed's patch order c, ph, pw)
    b = x.shape[0]
    return x.reshape(b, 16, 16, 3, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 32, 32)


def testbed_noise(n: int, seed: int) -> torch.Tensor:
    """The starting noise of n samples, drawn on the CPU (the same on every device and for every batch size)."""
    return torch.randn(n, 256, 12, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def sample_testbed(model: nn.Module, labels: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, noise: torch.Tensor,
                   steps: int = 30, cfg_scale: float = 3.0, batch: int = 64, dtype: torch.dtype = torch.float32,
                   device="cpu") -> torch.Tensor:
    """The testbed's reference sampler (weights/train_testbed.py: sample()): Euler over t = 1 -> 0 in `steps`
    uniform steps, classifier-free guidance against context row 10 (the empty prompt), the state kept in fp32 and the
    model run at `dtype`. Returns images [n, 3, 32, 32] in [-1, 1] on the CPU."""
    out = []
    ts = torch.linspace(1, 0, steps + 1, device=device)
    txt, vec = txt.to(device, dtype), vec.to(device, dtype)
    for s in range(0, len(labels), batch):
        lab = labels[s:s + batch].to(device)
        b = len(lab)
        x = noise[s:s + batch].to(device, torch.float32)
        lab2 = torch.cat([lab, torch.full_like(lab, 10)])
        img_ids = torch.zeros(16, 16, 3, device=device)
        img_ids[..., 1] = torch.arange(16, device=device)[:, None]
        img_ids[..., 2] = torch.arange(16, device=device)[None]
        img_ids = img_ids.reshape(1, 256, 3).expand(2 * b, -1, -1)
        txt_ids = torch.zeros(2 * b, txt.shape[1], 3, device=device)
        for i in range(steps):
            t = ts[i].expand(2 * b)
            v = model(torch.cat([x, x]).to(dtype), img_ids, txt[lab2], txt_ids, t, vec[lab2]).float()
            vc, vu = v.chunk(2)
            x = x + (ts[i + 1] - ts[i]) * (vu + cfg_scale * (vc - vu))
        out.append(_unpatchify(x).clamp(-1, 1).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------- image metrics

def image_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak = the range, 2), over the whole set (one MSE over all pixels)."""
    mse = float((x.double() - ref.double()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03, per channel, valid region)
    of images in [-1, 1], mapped to [0, 1] first."""
    a, b = (x.double() + 1) / 2, (ref.double() + 1) / 2
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11).contiguous()
    f = lambda t: F.conv2d(t, win, groups=3)  # noqa: E731
    mu_a, mu_b = f(a), f(b)
    saa, sbb, sab = f(a * a) - mu_a**2, f(b * b) - mu_b**2, f(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return float(s.mean())


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64 (eigen-decompositions, no scipy)."""
    mu1, s1, mu2, s2 = (t.double() for t in (mu1, s1, mu2, s2))
    ev, evec = torch.linalg.eigh(s1)
    r1 = (evec * ev.clamp_min(0).sqrt()) @ evec.t()
    m = r1 @ s2 @ r1
    tr_cross = torch.linalg.eigvalsh((m + m.t()) / 2).clamp_min(0).sqrt().sum()
    return max(0.0, float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_cross))


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = feats.double()
    return f.mean(0), torch.cov(f.t())


# ---------------------------------------------------------------- classifier

class CifarNet(nn.Module):
    """A small CNN (4 conv stages of 16-128 channels, 0.1 M parameters, ~4 M multiply-adds per image: trains in
    minutes on a CPU); `features` = the 128-d global-average-pooled last stage."""

    def __init__(self):
        super().__init__()
        chans = (3, 16, 32, 64, 128)
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, bias=False), nn.BatchNorm2d(chans[i + 1]),
                       nn.ReLU(inplace=True)]
            if i < 3:
                layers.append(nn.MaxPool2d(2))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_cifar(path: Path, limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A CIFAR-10 split from the shared .npz of JPEG bytes: (images uint8 [n, 3, 32, 32], labels int64 [n])."""
    import io

    import numpy as np
    from PIL import Image
    d = np.load(str(path))
    data, offs, labels = d["data"], d["offsets"], d["labels"]
    n = len(labels) if not limit else min(limit, len(labels))
    imgs = np.stack([np.asarray(Image.open(io.BytesIO(data[offs[i]:offs[i + 1]].tobytes())).convert("RGB"))
                     for i in range(n)])
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels[:n].astype("int64"))


def _to_input(u8: torch.Tensor) -> torch.Tensor:
    return u8.float().div(127.5).sub(1)


@torch.no_grad()
def classify(net: CifarNet, imgs: torch.Tensor, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, 128-d features) of images in [-1, 1] (float) or uint8."""
    net.eval()
    preds, feats = [], []
    for s in range(0, len(imgs), batch):
        x = imgs[s:s + batch]
        x = _to_input(x) if x.dtype == torch.uint8 else x.float()
        f = net.features(x)
        feats.append(f)
        preds.append(net.head(f).argmax(1))
    return torch.cat(preds), torch.cat(feats)


def train_classifier(data_dir: Path, epochs: int = 2, seed: int = 0, say=lambda m: None) -> dict:
    """Train CifarNet on the CIFAR-10 train split (SGD + one-cycle LR, flips and 2-pixel shifts); returns the state
    with its test accuracy and the test split's feature statistics."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    x_tr, y_tr = load_cifar(data_dir / "cifar10_train_jpg.npz")
    x_te, y_te = load_cifar(data_dir / "cifar10_test_jpg.npz")
    say(f"classifier: decoded {len(x_tr)} train / {len(x_te)} test images ({time.perf_counter() - t0:.0f}s)")
    net = CifarNet()
    bs = 128
    steps = epochs * (len(x_tr) // bs)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.2, total_steps=steps, pct_start=0.25)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for ep in range(epochs):
        net.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for s in range(0, len(perm) - bs + 1, bs):
            idx = perm[s:s + bs]
            x = _to_input(x_tr[idx])
            flip = torch.rand(bs, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
            x = torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), (2, 3))[..., 2:34, 2:34]
            loss = F.cross_entropy(net(x), y_tr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step % 100 == 0:
                say(f"classifier: step {step}/{steps}, loss {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)")
        pred, _ = classify(net, x_te[:2000])
        say(f"classifier: epoch {ep + 1}/{epochs}, loss {loss.item():.3f}, test acc (2k) "
            f"{(pred == y_te[:2000]).float().mean().item():.1%} ({time.perf_counter() - t0:.0f}s)")
    pred, feats = classify(net, x_te)
    mu, cov = feature_stats(feats)
    return {"version": CLASSIFIER_VERSION, "state": net.state_dict(), "epochs": epochs,
            "test_acc": float((pred == y_te).float().mean()), "test_mu": mu, "test_cov": cov,
            "train_seconds": round(time.perf_counter() - t0, 1)}


def get_classifier(data_dir: Path, epochs: int = 2, retrain: bool = False, say=lambda m: None,
                   cache: Path | None = None) -> tuple[CifarNet, dict]:
    """The cached classifier (~/.cache/convrot/cifar10_cnn_v2.pt; trained on first use: minutes on a CPU)."""
    path = Path(cache or CACHE) / f"cifar10_cnn_v{CLASSIFIER_VERSION}.pt"
    info = None
    if path.is_file() and not retrain:
        try:
            info = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged cache is retrained, not fatal
            say(f"classifier cache {path} unreadable ({e}); retraining")
    if info is None or info.get("version") != CLASSIFIER_VERSION:
        say(f"classifier: training on the CIFAR-10 train split ({epochs} epochs; cached at {path})")
        info = train_classifier(data_dir, epochs, say=say)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(info, tmp)
        os.replace(tmp, path)
    net = CifarNet()
    net.load_state_dict(info["state"])
    return net.eval(), info


# ---------------------------------------------------------------- variants

class NoRotW4A4Linear(nn.Module):
    """Plain round-to-nearest W4A4 without rotation: int4 per output channel (weight) and per token (activation),
    exact products (codes · codes in fp32: 7 · 7 · K stays below 2^24 for K < 342k), then the scales."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        codes, self.w_scale = reference.quantize_rows(weight, 4)
        self.w32 = codes.to(torch.float32)
        self.bias = bias
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a, sa = reference.quantize_rows(x.reshape(-1, x.shape[-1]), 4)
        out = (a.to(torch.float32) @ self.w32.t()) * sa.unsqueeze(-1) * self.w_scale
        if self.bias is not None:
            out = out + self.bias.to(device=x.device, dtype=torch.float32)
        return out.to(x.dtype).reshape(*lead, self.out_features)


class KitchenConvRotLinear(nn.Module):
    """comfy-kitchen's own ConvRot W4A4: TensorCoreConvRotW4A4Layout.quantize of the weight and its
    convrot_w4a4_linear (the registry picks the backend: eager on CPU, its CUDA kernels on a GPU)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        super().__init__()
        from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout
        from comfy_kitchen.tensor.convrot_w4a4 import convrot_w4a4_linear
        self._linear = convrot_w4a4_linear
        self.qdata, self.params = TensorCoreConvRotW4A4Layout.quantize(weight, convrot_groupsize=group_size)
        self.bias, self.group_size = bias, group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._linear(x, self.qdata, self.params.scale, bias, convrot_groupsize=self.group_size,
                            quant_group_size=self.params.quant_group_size)


def kitchen_version() -> str | None:
    """comfy_kitchen's version when its ConvRot layout imports, else None."""
    try:
        from comfy_kitchen.tensor import TensorCoreConvRotW4A4Layout  # noqa: F401
        from comfy_kitchen.tensor.convrot_w4a4 import convrot_w4a4_linear  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return None
    try:
        from importlib.metadata import version
        return version("comfy-kitchen")
    except Exception:  # noqa: BLE001
        return "unknown"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@dataclass
class Correction:
    """The calibration-free correction the `+lr` variants apply (convrot.correction.quantize_with_correction)."""
    rank: int = 32
    mode: str = "weight"
    iters: int = 2
    scale_search: bool = True

    def describe(self) -> str:
        return (f"rank {self.rank} ({'SVD of the weight, residual quantized' if self.mode == 'weight' else 'SVD of the quantization error'}"
                f"{f', {self.iters} refits' if self.mode == 'weight' and self.iters else ''})"
                + (", per-row MSE scale search" if self.scale_search else ""))


def build_variant(base: nn.Module, variant: str, group_size: int, correction: Correction, device,
                  cache: dict | None = None) -> tuple[nn.Module, dict]:
    """A copy of the bf16 `base` model as `variant`; returns (model, {w4a4_layers, w8a8_layers, bytes, branch_values}).

    `cache` (a dict) keeps each layer's corrected weight between calls, so `mixed+lr` after `compact+lr` (whose W4A4
    layers include mixed's) computes nothing new."""
    from .correction import CorrectedLinear, quantize_with_correction
    model = copy.deepcopy(base)
    names = _linear_names(model)
    info = {"w4a4_layers": 0, "w8a8_layers": 0, "branch_values": 0}
    if variant in ("bf16", "bf16-seeds"):
        info["bytes"] = linear_bytes(model, {})
        return model, info
    if variant == "fp8":
        for n in names:
            m = model.get_submodule(n)
            m.weight.data = m.weight.data.to(torch.float8_e4m3fn).to(m.weight.dtype)
        info["bytes"] = sum(model.get_submodule(n).weight.numel() for n in names)
        return model, info
    preset, _, suffix = variant.partition("+")
    if variant in ("w4a4-norot", "comfy-kitchen"):
        pol = LayerPolicy.for_names([f"{n}.weight" for n in names], "w4a4")
        todo = [n for n in names if pol.action(n) == W4A4 and model.get_submodule(n).in_features % group_size == 0]
        for n in todo:
            m = model.get_submodule(n)
            w, b = m.weight.data, None if m.bias is None else m.bias.data
            _replace(model, n, NoRotW4A4Linear(w, b) if variant == "w4a4-norot" else KitchenConvRotLinear(w, b, group_size))
        info["w4a4_layers"] = len(todo)
        info["bytes"] = linear_bytes(base, {n: W4A4 for n in todo})
        return model, info
    if preset not in PRESET_ORDER or suffix not in ("", "lr"):
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(DEFAULT_VARIANTS)} "
                         f"(or PRESET+lr for any preset)")
    floats = {n: (model.get_submodule(n).weight.data, model.get_submodule(n).bias) for n in names}
    plan = quantize_model(model, group_size, LayerPolicy.for_names([f"{n}.weight" for n in names], preset))
    acts = list(plan.values())
    info.update(w4a4_layers=acts.count(W4A4), w8a8_layers=acts.count(W8A8), bytes=linear_bytes(base, plan))
    if suffix == "lr":
        for n, act in plan.items():
            if act != W4A4:
                continue
            w, b = floats[n]
            key = (n, group_size, correction.rank, correction.mode, correction.iters, correction.scale_search)
            cw = None if cache is None else cache.get(key)
            if cw is None:
                cw = quantize_with_correction(w, group_size, 4, rank=correction.rank, mode=correction.mode,
                                              iters=correction.iters, scale_search=correction.scale_search)
                if cache is not None:
                    cache[key] = cw
            q = ConvRotLinear.from_quantized(cw.codes.contiguous(), cw.scale, None if b is None else b.data,
                                             group_size, 4)
            _replace(model, n, CorrectedLinear(q, cw.down, cw.up))
            info["branch_values"] += cw.branch_values()
        info["bytes"] += 2 * info["branch_values"]
    if torch.device(device).type == "cpu":
        use_cached_codes(model)
    return model, info


# ---------------------------------------------------------------- report

def grid_png(rows: list[tuple[str, torch.Tensor]], path: str, per_row: int = 10, zoom: int = 2) -> None:
    """One row of samples per variant (the first `per_row` images, one per class), labelled; PIL only."""
    from PIL import Image, ImageDraw
    side = 32 * zoom
    label_w = 150
    canvas = Image.new("RGB", (label_w + per_row * (side + 2), len(rows) * (side + 2) + 14), "white")
    draw = ImageDraw.Draw(canvas)
    for c in range(per_row):
        draw.text((label_w + c * (side + 2) + 2, 1), CIFAR_CLASSES[c % 10][:9], fill="black")
    for r, (name, imgs) in enumerate(rows):
        y = 14 + r * (side + 2)
        draw.text((4, y + side // 2 - 6), name, fill="black")
        u8 = ((imgs[:per_row] + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
        for c, im in enumerate(u8):
            canvas.paste(Image.fromarray(im).resize((side, side), Image.NEAREST), (label_w + c * (side + 2), y))
    canvas.save(path)


def run_images(*, variants=DEFAULT_VARIANTS, samples: int = 100, steps: int = 30, cfg_scale: float = 3.0,
               seed: int = 0, group_size: int = 256, correction: Correction | None = None, device="cpu",
               dtype: torch.dtype | None = None, batch: int = 50, classifier: tuple | None = None,
               classifier_epochs: int = 2, shared: Path | None = None, grid: str | None = None,
               progress=None) -> dict:
    """Sample the testbed with every variant and measure it; see the section comment above."""
    say = progress or (lambda m: None)
    paths = testbed_paths(shared)
    if paths is None:
        raise FileNotFoundError(f"testbed not found under {shared or SHARED} (weights/{TESTBED_FILE}, "
                                f"weights/{CONTEXT_FILE}, data/cifar10_test_jpg.npz)")
    wfile, cfile, data_dir = paths
    correction = correction or Correction()
    dev = torch.device(device)
    dtype = dtype or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    variants = list(variants)
    if "comfy-kitchen" in variants and kitchen_version() is None:
        say("comfy-kitchen's ConvRot layout does not import here: its row is skipped")
        variants.remove("comfy-kitchen")
    if "bf16" not in variants:
        variants.insert(0, "bf16")
    net, cinfo = classifier if classifier is not None else get_classifier(data_dir, classifier_epochs, say=say)
    base = load_flux_file(str(wfile)).to(dev)  # bf16; variants are built on the device
    txt, vec = load_context(cfile)
    labels = torch.arange(samples) % 10
    noise = testbed_noise(samples, seed)
    rows, images, cache = [], {}, {}
    for v in variants:
        t0 = time.perf_counter()
        v_linear, attn_cfg = split_attention(v)
        model, info = build_variant(base, v_linear, group_size, correction, dev, cache)
        if dtype != torch.bfloat16:
            model = model.to(dtype)  # floating buffers only: codes stay int8, weight scales fp32
        model = model.eval()
        t_build = time.perf_counter() - t0
        t1 = time.perf_counter()
        nz = testbed_noise(samples, seed + 1000) if v == "bf16-seeds" else noise
        with quantized_attention(attn_cfg):
            imgs = sample_testbed(model, labels, txt, vec, nz, steps, cfg_scale, batch, dtype, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t_sample = time.perf_counter() - t1
        del model
        images[v] = imgs
        pred, feats = classify(net, imgs)
        mu, cov = feature_stats(feats)
        row = {"variant": v, **info, "build_s": round(t_build, 2), "sample_s": round(t_sample, 2),
               "class_acc": float((pred == labels).float().mean()),
               "fd_test": frechet_distance(mu, cov, cinfo["test_mu"], cinfo["test_cov"]), "_stats": (mu, cov)}
        if v != "bf16-seeds":
            row["psnr_db"], row["ssim"] = image_psnr(imgs, images["bf16"]), ssim(imgs, images["bf16"])
        rows.append(row)
        say(f"{v}: build {t_build:.1f}s, {samples} samples x {steps} steps {t_sample:.1f}s, "
            + (f"PSNR {row['psnr_db']:.2f} dB, " if "psnr_db" in row else "")
            + f"acc {row['class_acc']:.1%}, FD {row['fd_test']:.2f}")
    mu0, cov0 = rows[0]["_stats"]
    for r in rows:
        r["fd_bf16"] = frechet_distance(*r.pop("_stats"), mu0, cov0)
    if grid:
        grid_png([(r["variant"], images[r["variant"]]) for r in rows], grid)
        say(f"wrote {grid}")
    kv = kitchen_version()
    return {"model": f"{wfile.name} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f} M parameters)",
            "device": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"),
            "torch": torch.__version__, "comfy_kitchen": kv, "dtype": str(dtype).replace("torch.", ""),
            "samples": samples, "steps": steps, "cfg_scale": cfg_scale, "seed": seed, "group_size": group_size,
            "correction": asdict(correction), "correction_desc": correction.describe(),
            "classifier": {"test_acc": cinfo["test_acc"], "epochs": cinfo["epochs"]},
            "rows": rows}


def images_markdown(rep: dict) -> str:
    lines = [
        "## ConvRot image quality on the CIFAR-10 testbed", "",
        f"- model: {rep['model']}; G = {rep['group_size']}; {rep['samples']} samples ({rep['samples'] // 10 if rep['samples'] >= 10 else '<1'} "
        f"per class), {rep['steps']} Euler steps, CFG {rep['cfg_scale']:g}, noise seed {rep['seed']} (the same noise for every variant)",
        f"- device {rep['device']}, compute dtype {rep['dtype']}, torch {rep['torch']}, comfy-kitchen "
        f"{rep['comfy_kitchen'] or 'not importable'}",
        f"- classifier: small CNN trained on the CIFAR-10 train split, test accuracy {rep['classifier']['test_acc']:.1%}; "
        "Fréchet distance in its 128-d features",
        f"- `+lr`: {rep['correction_desc']}",
        "",
        "| variant | W4A4 layers | W8A8 layers | linear weights MiB | PSNR dB | SSIM | class acc. | FD vs test | "
        "FD vs bf16 | sample s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rep["rows"]:
        p = r.get("psnr_db")
        ps = "—" if p is None else ("inf" if math.isinf(p) else f"{p:.2f}")
        ss = "—" if r.get("ssim") is None else f"{r['ssim']:.4f}"
        lines.append(f"| {r['variant']} | {r['w4a4_layers']} | {r['w8a8_layers']} | {r['bytes'] / 2**20:.2f} | {ps} | "
                     f"{ss} | {r['class_acc']:.1%} | {r['fd_test']:.2f} | {r['fd_bf16']:.2f} | {r['sample_s']:.1f} |")
    lines += ["", "PSNR / SSIM: each variant's images against bf16's from the same noise (PSNR over the whole set, "
              "images in [-1, 1], peak 2). `bf16-seeds`: bf16 from other noise, the noise floor of class accuracy "
              "and of both Fréchet columns at this sample count. Weight bytes: every linear's weight (+ fp32 scales, "
              "+ the `+lr` branches in bf16), biases excluded.", ""]
    return "\n".join(lines)


def build_images_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m convrot quality images",
        description="Image-level quality of every variant on the CIFAR-10 testbed in ../shared/ (weights/README.md): "
                    "paired PSNR/SSIM vs bf16, class accuracy and Fréchet distance under a small CIFAR-10 CNN.")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help="comma-separated; " + "; ".join(f"{k}: {v}" for k, v in VARIANT_HELP.items()))
    ap.add_argument("--samples", type=int, default=0, help="images per variant (default 100 on CUDA, 20 on CPU)")
    ap.add_argument("--steps", type=int, default=0, help="Euler steps (default 30 on CUDA, 10 on CPU)")
    ap.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="noise seed (bf16-seeds uses seed + 1000)")
    ap.add_argument("--group-size", type=int, default=256, choices=(16, 64, 256))
    ap.add_argument("--rank", type=int, default=32, help="+lr variants: rank of the branch (default 32)")
    ap.add_argument("--correction", choices=("weight", "error"), default="weight",
                    help="+lr variants: SVD of the weight (residual quantized) or of the quantization error")
    ap.add_argument("--iters", type=int, default=2, help="+lr, mode weight: refits of the branch (default 2)")
    ap.add_argument("--no-scale-search", action="store_true", help="+lr variants: plain absmax scales")
    ap.add_argument("--batch", type=int, default=50, help="images per sampler batch (x2 with CFG)")
    ap.add_argument("--classifier-epochs", type=int, default=2, help="epochs when the classifier is first trained")
    ap.add_argument("--retrain-classifier", action="store_true")
    ap.add_argument("--shared", default=None, help=f"the shared folder (default {SHARED})")
    ap.add_argument("--grid", metavar="PNG", help="write a picture grid (one row per variant)")
    ap.add_argument("--json", metavar="PATH", help="write the report as JSON ('-' = stdout, instead of markdown)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="model compute dtype (auto: float32 on CPU, where bf16 matmuls are slow; bfloat16 on CUDA)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("-q", "--quiet", action="store_true")
    return ap


def images_main(argv=None) -> int:
    a = build_images_parser().parse_args(argv)
    say = (lambda m: None) if a.quiet else (lambda m: print(f"[quality images] {m}", file=sys.stderr, flush=True))
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.device(a.device).type == "cuda"
    shared = Path(a.shared) if a.shared else None
    if testbed_paths(shared) is None:
        print(f"quality images: the CIFAR-10 testbed is not under {shared or SHARED} (needs weights/{TESTBED_FILE}, "
              f"weights/{CONTEXT_FILE} and data/); see ../shared/README.md", file=sys.stderr)
        return 2
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    dtype = None if a.dtype == "auto" else getattr(torch, a.dtype)
    corr = Correction(a.rank, a.correction, a.iters, not a.no_scale_search)
    try:
        clf = get_classifier(testbed_paths(shared)[2], a.classifier_epochs, a.retrain_classifier, say)
        say(f"classifier test accuracy {clf[1]['test_acc']:.1%} (CIFAR-10 test split, 10,000 images)")
        rep = run_images(variants=variants, samples=a.samples or (100 if cuda else 20), steps=a.steps or (30 if cuda else 10),
                         cfg_scale=a.cfg, seed=a.seed, group_size=a.group_size, correction=corr, device=a.device,
                         dtype=dtype, batch=a.batch, classifier=clf, shared=shared, grid=a.grid, progress=say)
    except ValueError as e:
        print(f"quality images: {e}", file=sys.stderr)
        return 2
    if a.json == "-":
        print(to_json(rep))
    else:
        print(images_markdown(rep))
        if a.json:
            Path(a.json).write_text(to_json(rep))
            say(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
