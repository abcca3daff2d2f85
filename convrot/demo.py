"""The embedded demo: a seeded FLUX-architecture model, quantized, run, and compared with its bf16 self."""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .flux import FluxConfig, Flux, example_inputs, random_flux
from .linear import ConvRotLinear
from .policy import BF16, LayerPolicy
from .quantizer import quantize_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def capture_linear_inputs(model: nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    """The input each nn.Linear sees in one forward pass (the real activations, outliers and all)."""
    seen, hooks = {}, []

    def hook(name):
        def record(mod, args, out):  # returns None: a forward hook's return value would replace the output
            seen.setdefault(name, args[0].detach())
        return record

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def linear_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes as stored, bytes in bf16) over the linear layers; works on meta-device models."""
    stored = bf16 = 0
    for mod in model.modules():
        if isinstance(mod, ConvRotLinear):
            stored += sum(t.numel() * t.element_size() for t in (mod.weight, mod.weight_scale))
            bf16 += mod.in_features * mod.out_features * 2
        elif isinstance(mod, nn.Linear):
            stored += mod.weight.numel() * 2
            bf16 += mod.weight.numel() * 2
    return stored, bf16


def projected_bytes(cfg: FluxConfig, preset: str, group_size: int = 256) -> tuple[int, int]:
    """(bytes under the preset, bytes in bf16) of all transformer weights, from shapes alone (nothing allocated).

    Per linear layer: bf16 2 bytes/weight; W4A4 0.5 byte/weight + a 4-byte scale per output channel; W8A8 1 byte +
    4 bytes per channel. Biases, norms and every other tensor stay bf16. A `PRESET+lr` preset adds its low-rank
    correction to each W4A4 layer: rank * (in + out) bf16 values.
    """
    from .correction import split_preset
    preset, rank = split_preset(preset)
    with torch.device("meta"):
        model = Flux(cfg)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    policy = LayerPolicy.for_names([f"{n}.weight" for n in linears], preset)
    stored = bf16 = 0
    for name, p in model.named_parameters():
        bf16 += 2 * p.numel()
        layer = name.rsplit(".", 1)[0]
        m = linears.get(layer)
        act = policy.action(layer) if m is not None and name.endswith(".weight") else BF16
        if act == BF16 or m.in_features % group_size:
            stored += 2 * p.numel()
        else:
            stored += (p.numel() // 2 if act == "w4a4" else p.numel()) + 4 * m.out_features
            if act == "w4a4":
                stored += 2 * rank * (m.in_features + m.out_features)
    return stored, bf16


def run_demo(preset: str, group_size: int, hidden: int, depth: int, single: int, seed: int) -> int:
    torch.manual_seed(seed)
    cfg = FluxConfig.tiny(hidden=hidden, depth=depth, single=single)
    print(f"ConvRot demo: seeded FLUX-architecture model, hidden {hidden}, {depth} double + {single} single "
          f"blocks, preset {preset!r}, group size {group_size}, torch {torch.__version__}, CPU reference path")
    model = random_flux(cfg, seed=seed)
    inputs = example_inputs(cfg, height=64, width=64, txt_len=64, seed=seed + 1)
    acts = capture_linear_inputs(model, inputs)
    qmodel = copy.deepcopy(model)
    t0 = time.time()
    plan = quantize_model(qmodel, group_size, LayerPolicy.for_names(
        [f"{n}.weight" for n in acts], preset))
    t_quant = time.time() - t0

    print(f"\n{'layer':<34} {'action':>6} {'K':>6} {'N':>6} {'rel. error':>10}")
    errs = []
    with torch.no_grad():
        for name, x in acts.items():
            act = plan[name]
            if act == BF16:
                continue
            ref = model.get_submodule(name)(x)
            got = qmodel.get_submodule(name)(x)
            e = rel_err(got, ref)
            errs.append(e)
            m = qmodel.get_submodule(name)
            print(f"{name:<34} {act:>6} {m.in_features:>6} {m.out_features:>6} {e:>10.4f}")
        t0 = time.time()
        ref_out = model(**inputs)
        t_ref = time.time() - t0
        t0 = time.time()
        q_out = qmodel(**inputs)
        t_q = time.time() - t0
    out_err = rel_err(q_out, ref_out)
    stored, bf16 = linear_bytes(qmodel)
    full_stored, full_bf16 = projected_bytes(FluxConfig(), preset, group_size)
    kept = sum(1 for a in plan.values() if a == BF16)
    print(f"\nquantized layers: {len(errs)} ({kept} kept in bf16); per-layer relative error: "
          f"mean {sum(errs) / len(errs):.4f}, max {max(errs):.4f}")
    print(f"final output relative error vs bf16: {out_err:.4f}")
    print(f"linear weights: {stored / 1e6:.2f} MB vs {bf16 / 1e6:.2f} MB bf16 -> {bf16 / stored:.2f}x smaller "
          f"(this model); FLUX.1-dev transformer: {full_stored / 1e9:.2f} GB vs {full_bf16 / 1e9:.2f} GB -> "
          f"{full_bf16 / full_stored:.2f}x smaller")
    print(f"time on this machine: quantize {t_quant:.2f}s, forward bf16 {t_ref:.2f}s, ConvRot {t_q:.2f}s "
          f"(CPU reference path; speed is measured on the GPU with `python -m convrot bench`)")
    return 0
