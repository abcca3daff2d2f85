"""`python -m convrot bench`: per-linear timings of the CUDA kernels against bf16 F.linear (and comfy-kitchen).

Each timed call runs on a cold L2 (a 256 MB buffer is overwritten before it, outside the timed region), as
weights and activations are in a real model; times are medians of CUDA-event pairs around single calls.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch
import torch.nn.functional as F

SHAPES = [
    (4096, 3072, 9216),
    (4096, 3072, 3072),
    (4096, 3072, 12288),
    (4096, 12288, 3072),
    (512, 3072, 9216),
    (4608, 3072, 21504),
    (4608, 15360, 3072),
]


class Timer:
    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.flush = torch.ones(256 * 1024 * 1024 // 4, dtype=torch.float32, device="cuda")
        self.flush_view = self.flush.view(-1, 4096)
        self.flush_out = torch.empty(4096, dtype=torch.float32, device="cuda")

    def __call__(self, fn) -> float:
        """Median microseconds of fn() over self.iters calls, each after an L2 flush."""
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.iters)]
        for i in range(self.iters):
            # Flush by reading, not writing: a zero_() flush leaves up to 50 MB of dirty lines in L2 that the
            # timed kernel then pays to write back (v1/v2 numbers of memory-bound kernels were inflated by it).
            torch.amax(self.flush_view, dim=0, out=self.flush_out)
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src))
    del src, dst
    return 2 * n / us / 1e3


def _kitchen():
    try:
        import comfy_kitchen as ck

        return ck
    except Exception as e:  # optional comparison
        print(f"# comfy-kitchen not importable ({type(e).__name__}: {e}); its column is skipped")
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m convrot bench", description=__doc__)
    p.add_argument("--group-size", type=int, default=256, choices=(16, 64, 256))
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--shapes", default=None, help="M,K,N;M,K,N;... (default: FLUX.1 linears at 1024^2)")
    p.add_argument("--no-kitchen", action="store_true", help="skip comfy-kitchen's convrot_w4a4_linear")
    p.add_argument("--sched-sweep", action="store_true", help="also time GEMM tile swizzle / raster order choices")
    p.add_argument("--act-sweep", action="store_true", help="also time the act kernel with one row per block")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args(argv)

    if not torch.cuda.is_available():
        print("convrot bench: no CUDA device", file=sys.stderr)
        return 2
    from convrot import kernels

    if not kernels.available(torch.device("cuda")):
        print(f"convrot bench: CUDA kernels not available: {kernels.unavailable_reason()}", file=sys.stderr)
        return 2
    ops = torch.ops.convrot
    sm90 = torch.cuda.get_device_capability() == (9, 0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    G = args.group_size
    shapes = SHAPES if not args.shapes else [tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")]
    ck = None if args.no_kitchen else _kitchen()

    timer = Timer(args.iters, args.warmup)
    props = torch.cuda.get_device_properties(0)
    print(f"# device: {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}, G={G}, dtype={args.dtype}, route={'sm90 CUTLASS int8' if sm90 else 'mma.sync s4'}")
    bw = copy_bandwidth(timer)
    print(f"# D2D copy bandwidth: {bw:.0f} GB/s (read + write)")

    rows = []
    for (M, K, N) in shapes:
        torch.manual_seed(M + K + N)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        x[:, :: max(1, K // 8)] *= 50  # a few outlier channels, as in real activations
        w = (torch.randn(N, K, device="cuda", dtype=dtype) * 0.02)
        bias = torch.randn(N, device="cuda", dtype=dtype)
        w_q, w_s = kernels.rotate_quantize(w, G)
        w8 = kernels.prepare_weight(w_q)
        r = {"M": M, "K": K, "N": N}
        r["bf16_us"] = timer(lambda: F.linear(x, w, bias))
        r["ours_us"] = timer(lambda: kernels.w4a4_linear(x, w_q, w_s, bias, G))
        r["ours_prepW_us"] = timer(lambda: kernels.w4a4_linear(x, w8, w_s, bias, G))
        if sm90:
            a8, a_s = ops.rotate_quantize_i8(x, G)
            for cfg in (0, 1, 2):
                try:
                    r[f"gemm_cfg{cfg}_us"] = timer(lambda: ops.gemm_i8_sm90(a8, a_s, w8, w_s, bias, dtype, cfg))
                except RuntimeError as e:  # experimental configs exist only in some builds
                    print(f"# config {cfg}: {str(e).splitlines()[0][:200]}")
            r["gemm_us"] = timer(lambda: ops.gemm_i8_sm90(a8, a_s, w8, w_s, bias, dtype, -1))
            if args.sched_sweep:
                import os

                sweep = {}
                for swz in (1, 2, 4, 8):
                    for ras in (0, 1, 2):
                        os.environ["CONVROT_GEMM_SWIZZLE"], os.environ["CONVROT_GEMM_RASTER"] = str(swz), str(ras)
                        sweep[f"s{swz}r{ras}"] = timer(lambda: ops.gemm_i8_sm90(a8, a_s, w8, w_s, bias, dtype, -1))
                os.environ.pop("CONVROT_GEMM_SWIZZLE")
                os.environ.pop("CONVROT_GEMM_RASTER")
                r["sched_sweep"] = sweep
            r["unpackW_us"] = timer(lambda: ops.unpack_int4(w_q))
            r["act_i8_us"] = timer(lambda: ops.rotate_quantize_i8(x, G))
        else:
            a4, a_s = ops.rotate_quantize(x, G)
            r["gemm_us"] = timer(lambda: ops.gemm_s4_mma(a4, a_s, w_q, w_s, bias, dtype))
        esz = x.element_size()
        r["act_us"] = timer(lambda: ops.rotate_quantize(x, G))
        # The same bytes as a plain copy at this size (reading x, writing x): what "% of copy" can reach here.
        r["clone_GBs"] = 2 * M * K * esz / timer(lambda: x.clone()) / 1e3
        if sm90:
            r["act_unpack_us"] = timer(lambda: ops.rotate_quantize_i8_unpack(x, G, w_q))
        if args.act_sweep:
            import os

            for label, val in (("rowblock", "-1"), ("auto", "0")):
                os.environ["CONVROT_ACT_GRID"] = val
                r[f"act_i8_{label}_us"] = timer(lambda: ops.rotate_quantize_i8(x, G))
                r[f"act_{label}_us"] = timer(lambda: ops.rotate_quantize(x, G))
            os.environ.pop("CONVROT_ACT_GRID")
        r["act_GBs"] = (M * K * esz + M * K // 2 + 4 * M) / r["act_us"] / 1e3
        if "act_i8_us" in r:
            r["act_i8_GBs"] = (M * K * esz + M * K + 4 * M) / r["act_i8_us"] / 1e3
        r["tops_gemm"] = 2 * M * N * K / r["gemm_us"] / 1e6
        if ck is not None:
            try:
                qd, sc = ck.quantize_convrot_w4a4_weight(w, convrot_groupsize=G)
                r["kitchen_us"] = timer(lambda: ck.convrot_w4a4_linear(x, qd, sc, bias, convrot_groupsize=G))
            except Exception as e:
                print(f"# comfy-kitchen failed at {M}x{K}x{N}: {type(e).__name__}: {e}")
        rows.append(r)
        del x, w, w_q, w8
        torch.cuda.empty_cache()

    # Weight quantization rate on the GPU (rotate + quantize + pack), projected to a 12B-parameter model.
    wq = torch.randn(12288, 3072, device="cuda", dtype=torch.bfloat16)
    wq_us = timer(lambda: kernels.rotate_quantize(wq, G))
    proj_s = 12e9 / (wq.numel() / (wq_us * 1e-6))

    hdr = (f"{'M':>5} {'K':>6} {'N':>6} | {'bf16':>7} | {'ours':>7} {'x':>5} | {'ours+W8':>7} {'x':>5} | "
           f"{'GEMM':>7} {'x':>5} {'TOPS':>5} | {'act':>6} {'GB/s':>5} {'%cp':>4}" + (" | kitchen     x" if ck else ""))
    print(hdr)
    for r in rows:
        line = (f"{r['M']:>5} {r['K']:>6} {r['N']:>6} | {r['bf16_us']:7.1f} | {r['ours_us']:7.1f} "
                f"{r['bf16_us'] / r['ours_us']:5.2f} | {r['ours_prepW_us']:7.1f} {r['bf16_us'] / r['ours_prepW_us']:5.2f} | "
                f"{r['gemm_us']:7.1f} {r['bf16_us'] / r['gemm_us']:5.2f} {r['tops_gemm']:5.0f} | "
                f"{r['act_us']:6.1f} {r['act_GBs']:5.0f} {100 * r['act_GBs'] / bw:4.0f}")
        if ck:
            k_us = r.get("kitchen_us")
            line += f" | {k_us:7.1f} {r['bf16_us'] / k_us:5.2f}" if k_us else " |       -     -"
        print(line)
    big = [r for r in rows if r["M"] >= 4096]
    for key, label in (("ours_us", "whole op (per-call weight expansion)"), ("ours_prepW_us", "whole op (int8 weight cache)")):
        if big:
            gm = math.exp(sum(math.log(r["bf16_us"] / r[key]) for r in big) / len(big))
            print(f"# geomean x bf16, M>=4096, {label}: {gm:.2f}")
    if sm90:
        print("# act kernel writing int8 codes (fused path): " + ", ".join(
            f"{r['M']}x{r['K']}: {r['act_i8_us']:.1f} us {100 * r['act_i8_GBs'] / bw:.0f}%" for r in rows))
        print("# GEMM tile configs (us; 0 = 256x128 c1x2, 1 = 128x128 ping-pong c2x1, 2 = 128x256 c2x1 stream-K):")
        for r in rows:
            print(f"#   {r['M']}x{r['K']}x{r['N']}: " + "  ".join(
                f"{c}:{r[f'gemm_cfg{c}_us']:.1f}" for c in range(3) if f"gemm_cfg{c}_us" in r))
        if args.sched_sweep:
            print("# GEMM (auto config) by swizzle s and raster r (0 heuristic, 1 along M, 2 along N), us:")
            for r in rows:
                best = min(r["sched_sweep"], key=r["sched_sweep"].get)
                print(f"#   {r['M']}x{r['K']}x{r['N']}: default {r['gemm_us']:.1f}, best {best} {r['sched_sweep'][best]:.1f}; "
                      + " ".join(f"{k}:{v:.0f}" for k, v in r["sched_sweep"].items()))
        if args.act_sweep:
            print("# act kernel schedule (us, int8 / packed): " + ", ".join(
                f"{r['M']}x{r['K']}: one row per block {r['act_i8_rowblock_us']:.1f}/{r['act_rowblock_us']:.1f}, "
                f"persistent {r['act_i8_auto_us']:.1f}/{r['act_auto_us']:.1f}" for r in rows))
        print("# act int8 + weight expansion fused in one launch (us): " + ", ".join(
            f"{r['M']}x{r['K']}x{r['N']}: {r['act_unpack_us']:.1f} (separate {r['act_i8_us'] + r['unpackW_us']:.1f})" for r in rows))
        print("# weight int4->int8 expansion (us): " + ", ".join(f"{r['N']}x{r['K']}: {r['unpackW_us']:.1f}" for r in rows))
    print("# same-size copy (x.clone) GB/s: " + ", ".join(f"{r['M']}x{r['K']}: {r['clone_GBs']:.0f}" for r in rows))
    print(f"# weight quantization: 12288x3072 in {wq_us:.1f} us -> 12B parameters in ~{proj_s:.2f} s of GPU time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "torch": torch.__version__, "cuda": torch.version.cuda,
                       "copy_GBs": bw, "rows": rows, "wquant_12B_s": proj_s}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
