"""GPU benchmark: ConvRot's quantized attention (Triton: INT8 QKᵀ, FP8 or bf16 P·V) against torch SDPA in bf16.

FLUX shapes, B=1, H=24, D=128: L=4608 (1024², 4096 image + 512 text tokens), L=4096+77 (1024² with a 77-token
prompt), L=1280 (512²: 1024 + 256). Every shape is timed in the same run for: SDPA with the flash backend, SDPA
with cuDNN (where this torch has it), the quantized kernel with FP8 P·V (sm_89+) and bf16 P·V, each with the
fixed tile config and, with --autotune, the autotuned one. Times are CUDA-event medians over --iters calls after
warm-up; the quantized rows include the Q/K/V quantization launches (what a ComfyUI call costs). --check compares
each output with the PyTorch reference (convrot/attention.py) and SDPA.

    python bench/attention_bench.py [--check] [--autotune] [--iters 50] [--shapes 4608,4173,1280] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from convrot import attention as A  # noqa: E402
from convrot import triton_attention as T  # noqa: E402


def timed(fn, iters: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def sdpa_backends():
    from torch.nn.attention import SDPBackend
    out = [("sdpa flash bf16", SDPBackend.FLASH_ATTENTION)]
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out.append(("sdpa cuDNN bf16", SDPBackend.CUDNN_ATTENTION))
    return out


def kitchen_attention():
    """comfy-kitchen's INT8 attention (what newer ComfyUI's --use-ck-attention runs; kitchen >= 0.2.36) as
    (label, fn(q, k, v) on [B, H, L, D]), or None with the reason printed: it is compared where it can be run."""
    try:
        import comfy_kitchen as ck
        from importlib.metadata import version
        ver = getattr(ck, "__version__", None) or version("comfy-kitchen")
    except Exception as e:  # noqa: BLE001
        ver, ck = f"not importable ({type(e).__name__})", None
    if ck is None or not hasattr(ck, "int8_attention"):
        print(f"comfy-kitchen INT8 attention: not in this comfy-kitchen ({ver}); PYTHONPATH a kitchen >= 0.2.36")
        return None
    if not ck.int8_attention_is_available(torch.device("cuda")):
        print(f"comfy-kitchen INT8 attention: comfy-kitchen {ver} says it cannot run on this GPU")
        return None
    return f"comfy-kitchen int8_attention ({ver})", lambda q, k, v: ck.int8_attention(q, k, v)


def inputs(lq: int, heads: int, d: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, heads, lq, d, device="cuda", generator=g, dtype=torch.bfloat16)
    k = (torch.randn(1, heads, lq, d, device="cuda", generator=g) + 2 * torch.randn(1, heads, 1, d, device="cuda",
                                                                                     generator=g)).bfloat16()
    # V as FLUX's qkv split leaves it: a strided view of a [B, L, 3, H, D] tensor
    qkv = torch.randn(1, lq, 3, heads, d, device="cuda", generator=g, dtype=torch.bfloat16)
    v = qkv[:, :, 2].permute(0, 2, 1, 3)
    return q, k, v


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4608,4173,1280", help="comma-separated sequence lengths (default FLUX's)")
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--check", action="store_true", help="compare outputs with the reference and SDPA")
    ap.add_argument("--autotune", action="store_true", help="also time the autotuned tile config")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    ok, why = T.available(dev)
    props = torch.cuda.get_device_properties(dev)
    import triton
    print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}), "
          f"triton {triton.__version__}, python {platform.python_version()}")
    print(f"kernel: {why}")
    if not ok:
        return 1
    cc = (props.major, props.minor)
    variants = [("qattn fp8 P·V", replace(A.DEFAULT, pv="fp8"))] if cc >= T.FP8_CC else []
    variants.append(("qattn bf16 P·V", replace(A.DEFAULT, pv="bf16")))
    fixed = T.FIXED_CONFIG["sm90" if cc[0] == 9 else "other"]
    print(f"fixed tile config (BLOCK_M, num_warps, num_stages) = {fixed}; q_block {A.DEFAULT.q_block}, "
          f"k_block {A.DEFAULT.k_block}")
    rows = []
    kitchen = kitchen_attention()
    for lq in (int(s) for s in a.shapes.split(",") if s.strip()):
        q, k, v = inputs(lq, a.heads, a.dim)
        flops = 4 * a.heads * lq * lq * a.dim
        base = None
        results = []
        for name, backend in sdpa_backends():
            from torch.nn.attention import sdpa_kernel
            try:
                with sdpa_kernel([backend]):
                    ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), a.iters)
            except Exception as e:  # noqa: BLE001 - a backend this torch/GPU lacks
                print(f"  L={lq} {name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                continue
            base = ms if base is None else min(base, ms)
            results.append((name, ms, None))
        sdpa_out = F.scaled_dot_product_attention(q, k, v)
        if kitchen is not None:
            label, fn = kitchen
            try:
                ms = timed(lambda: fn(q, k, v), a.iters)
                results.append((label, ms, {"vs_sdpa": rel(fn(q, k, v), sdpa_out)} if a.check else None))
            except Exception as e:  # noqa: BLE001 - a shape or build it refuses: a finding, not the end
                print(f"  L={lq} {label}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        for name, cfg in variants:
            modes = [("fixed", dict(autotune=False))] + ([("autotuned", dict(autotune=True))] if a.autotune else [])
            for mode, kw in modes:
                ms = timed(lambda: T.attention(q, k, v, cfg, **kw), a.iters)
                label = f"{name} ({mode}{', ' + T.best_config(q) if mode == 'autotuned' else ''})"
                chk = None
                if a.check:
                    out = T.attention(q, k, v, cfg, **kw)
                    want = A.reference_attention(q, k, v, cfg)
                    chk = {"vs_reference": rel(out, want), "vs_sdpa": rel(out, sdpa_out),
                           "reference_vs_sdpa": rel(want, sdpa_out)}
                results.append((label, ms, chk))
        print(f"\nL={lq} (B=1, H={a.heads}, D={a.dim}; {flops / 1e9:.0f} GFLOP per call)")
        print(f"  {'kernel':58s} {'ms':>8s} {'TFLOP/s':>8s} {'vs best SDPA':>13s}")
        for label, ms, chk in results:
            ratio = base / ms if base else float("nan")
            extra = ""
            if chk and "vs_reference" in chk:
                extra = (f"  rel err vs reference {chk['vs_reference']:.2e}, vs SDPA {chk['vs_sdpa']:.2e} "
                         f"(reference vs SDPA {chk['reference_vs_sdpa']:.2e})")
            elif chk:
                extra = f"  rel err vs SDPA {chk['vs_sdpa']:.2e}"
            print(f"  {label:58s} {ms:8.3f} {flops / ms / 1e9:8.1f} {ratio:12.2f}x{extra}")
            rows.append({"L": lq, "kernel": label, "ms": ms, "speedup_vs_best_sdpa": ratio, "check": chk})
    if a.json:
        Path(a.json).write_text(json.dumps({"device": props.name, "cc": list(cc), "torch": torch.__version__,
                                            "triton": triton.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
