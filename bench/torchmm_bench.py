"""Per-FLUX-linear timings of the torchmm route (convrot/torchmm.py) against cuBLAS bf16, in one run (CUDA only).

    python bench/torchmm_bench.py [--check] [--compile] [--group-size 256] [--iters 30] [--shapes 4096x3072x9216,...]

For each (M, K, N), bf16 activations and bias: cuBLAS bf16 F.linear, then (times in µs, "x" = bf16 time / that time,
> 1 is faster than bf16):
  W4 int8     torchmm W4A4 whole linear on torch._int_mm (rotate+quantize, per-call int4 unpack, int32 GEMM,
              epilogue in torch ops): what CONVROT_ROUTE=torchmm runs by default
  W4 fp8      the same on torch._scaled_mm with e4m3 operands, scales and bias in the GEMM (sm_89+;
              CONVROT_TORCHMM_GEMM=fp8)
  W8 int8     torchmm W8A8 whole linear
  dequant W4  the current no-compiler fallback (convrot/dequant.py: codes expanded to bf16 per call + cuBLAS)
  rq          torchmm's rotate (tensor-core mm, fp32 out) + per-token quantize alone, to int8 codes
  unpack      the per-call int4 -> int8 weight unpack alone
  int_mm      torch._int_mm alone on ready int8 codes (no epilogue), and
  fp8 mm      torch._scaled_mm alone on ready fp8 codes (its epilogue included)
--compile adds the W4 int8 / W4 fp8 / W8 int8 / dequant W4 columns again under torch.compile (Inductor, as
ConvRot Compile Blocks compiles blocks): there the epilogue and the quantize fuse; one compile per shape and
variant (tens of seconds each, so pass a few --shapes).
Every timed call runs on a cold L2 (convrot/bench.py's Timer: a 256 MB buffer read before it), CUDA events,
medians of --iters. --check compares each variant's output with convrot.reference on inputs with outlier channels
(codes of a rounding tie may differ: the rotation's fp32 sums run in another order).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from convrot import dequant, reference, torchmm  # noqa: E402
from convrot.bench import Timer  # noqa: E402
from triton_bench import compare, make_inputs, parse_shapes, row_cells, time_runs  # noqa: E402  (the same inputs, checks, rows)

# FLUX.1-dev's linears: (K, N) of the double blocks' qkv/proj/mlp and the single blocks' out projection, at the
# token counts of a 1024² image (4096 image tokens, 4608 with the text) and of the 512-token text stream
FLUX_KN = [(3072, 3072), (3072, 9216), (3072, 12288), (12288, 3072), (15360, 3072)]
FLUX_M = [4096, 4608, 512]
FLUX_SHAPES = [(m, k, n) for m in FLUX_M for (k, n) in FLUX_KN]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="also compare every variant with convrot.reference")
    ap.add_argument("--compile", action="store_true", help="also time the variants under torch.compile (Inductor)")
    ap.add_argument("--group-size", type=int, default=256, choices=(16, 64, 256))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--shapes", default=None, help="comma-separated MxKxN list (default: the FLUX linears)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("CUDA only: no GPU visible to PyTorch")
        return 2
    shapes = parse_shapes(args.shapes, FLUX_SHAPES)
    g = args.group_size
    dev = torch.device("cuda", torch.cuda.current_device())
    props = torch.cuda.get_device_properties(dev)
    try:
        import triton
        tri = triton.__version__
    except Exception:
        tri = None
    print(f"device: {props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs), "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}, HIP {torch.version.hip}), triton {tri}, G={g}, "
          f"iters={args.iters}, cold L2, CUDA events, medians")
    ok, why = torchmm.available(dev)
    print(f"torchmm route: {'available' if ok else 'NOT available'}: {why}")
    if not ok:
        return 1
    f8 = torchmm.GEMMS["fp8"]
    fp8_ok = not torch.version.hip and (props.major, props.minor) >= f8.cuda_cc
    if fp8_ok:
        err = torchmm._probe_once(dev, "fp8")
        print(f"fp8 GEMM probe: {'ok' if err is None else err}")
        fp8_ok = err is None
    timer = Timer(args.iters, warmup=3)

    def w4_int8(x, w4, s4, bias):
        return torchmm.linear(x, w4, s4, bias, g, 4, "int8")

    def w4_fp8(x, w4, s4, bias):
        return torchmm.linear(x, w4, s4, bias, g, 4, "fp8")

    def w8_int8(x, w8, s8, bias):
        return torchmm.linear(x, w8, s8, bias, g, 8, "int8")

    def dq4(x, w4, s4, bias):
        return dequant.linear(x, w4, s4, bias, g, 4)

    variants = {"W4 int8": w4_int8, "W4 fp8": w4_fp8, "W8 int8": w8_int8, "dequant W4": dq4}
    compiled = {}
    if args.compile:
        cfg = torch._dynamo.config
        for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(cfg, name):
                setattr(cfg, name, 4096)  # one compile per shape and variant, never a silent eager fallback
        compiled = {f"c {name}": torch.compile(fn, dynamic=False) for name, fn in variants.items()}
    cols = ["bf16", "W4 int8", "W4 fp8", "W8 int8", "dequant W4", "rq", "unpack", "int_mm", "fp8 mm",
            *compiled]
    print()
    print(f"{'M x K x N':>18} " + " ".join(f"{c:>16}" for c in cols))
    for (m, k, n) in shapes:
        x, w, bias, (w4, s4), (w8, s8) = make_inputs(m, k, n, g)
        a8, a_s = torchmm.quantize(torchmm.rotate(x, g), 4)
        wc = reference.unpack_int4(w4)
        a_f8, w_f8 = a8.to(torch.float8_e4m3fn), wc.to(torch.float8_e4m3fn)
        runs = {
            "bf16": lambda: F.linear(x, w, bias),
            "W4 int8": lambda: w4_int8(x, w4, s4, bias),
            "W8 int8": lambda: w8_int8(x, w8, s8, bias),
            "dequant W4": lambda: dq4(x, w4, s4, bias),
            "rq": lambda: torchmm.quantize(torchmm.rotate(x, g), 4),
            "unpack": lambda: reference.unpack_int4(w4),
            "int_mm": lambda: torchmm.int_mm(a8, wc),
        }
        if fp8_ok and k % f8.kn_multiple == 0 and n % f8.kn_multiple == 0:
            runs["W4 fp8"] = lambda: w4_fp8(x, w4, s4, bias)
            runs["fp8 mm"] = lambda: torch._scaled_mm(a_f8, w_f8.t(), a_s.unsqueeze(-1), s4.unsqueeze(0), bias=bias,
                                                      out_dtype=torch.bfloat16, use_fast_accum=False)
        for name, fn in compiled.items():
            if name == "c W4 fp8" and "W4 fp8" not in runs:
                continue
            wq, sq = (w8, s8) if "W8" in name else (w4, s4)
            runs[name] = (lambda fn=fn, wq=wq, sq=sq: fn(x, wq, sq, bias))
        times = time_runs(runs, timer, f"{m}x{k}x{n}")
        print(f"{f'{m}x{k}x{n}':>18} " + row_cells(times, cols, 16), flush=True)
        if args.check:
            q, s = torchmm.rotate_quantize(x, g)
            qr, sr = reference.rotate_quantize(x, g, 4)
            dq = (reference.unpack_int4(q).int() - reference.unpack_int4(qr).int()).abs()
            srel = ((s - sr).abs() / sr).max().item()
            print(f"{'':>18}  check rq: {int((dq != 0).sum())} of {dq.numel()} codes differ (max {int(dq.max())}), "
                  f"scale max rel diff {srel:.1e}")
            want4 = reference.convrot_linear(x, w4, s4, bias, g, 4)
            want8 = reference.convrot_linear(x, w8, s8, bias, g, 8)
            own4 = reference.quantized_gemm(q, s, w4, s4, bias, torch.bfloat16, 4)  # the route's own codes
            parts = [f"W4 int8: {compare(w4_int8(x, w4, s4, bias), want4)} (own codes: "
                     f"{compare(w4_int8(x, w4, s4, bias), own4)})",
                     f"W8 int8: {compare(w8_int8(x, w8, s8, bias), want8)}"]
            if "W4 fp8" in runs:
                parts.append(f"W4 fp8: {compare(w4_fp8(x, w4, s4, bias), want4)} (own codes: "
                             f"{compare(w4_fp8(x, w4, s4, bias), own4)})")
            for name, fn in compiled.items():
                if name in runs:
                    wq, sq, want = (w8, s8, want8) if "W8" in name else (w4, s4, want4)
                    if "dequant" not in name:
                        try:
                            parts.append(f"{name}: {compare(fn(x, wq, sq, bias), want)}")
                        except Exception as e:  # a variant that failed to compile: its timing cell says so
                            parts.append(f"{name}: failed ({type(e).__name__})")
            print(f"{'':>18}  check " + "; ".join(parts))
            print(f"{'':>18}  (quantization itself, reference W4A4 vs bf16: {compare(want4, F.linear(x, w, bias))})")
        del x, w, bias, w4, s4, w8, s8, a8, a_s, wc, a_f8, w_f8, runs
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
