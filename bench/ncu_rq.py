"""Profile target for Nsight Compute: the Triton rotate+quantize methods at FLUX shapes, split order, G = 256; fwht
and row with the block configs autotuning picked at 4096 x 3072 on an H200 for S22's kernels (bench/NOTES.md
Session 11; the row kernel has since taken K = 3072 as three tiles), dot with one of its autotune configs.
Run on the GPU machine:

    ncu --kernel-name regex:rotate_quantize --section SpeedOfLight --section InstructionStats \
        --section WarpStateStats --section Occupancy python3 bench/ncu_rq.py
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from convrot import triton_kernels as tk  # noqa: E402

j = tk._jit()
h = tk._hadamard_pm1(16, "cuda")
CONFIGS = {"dot": dict(BLOCK_M=16, BLOCK_K=256, num_warps=4), "fwht": dict(BLOCK_M=2, BLOCK_K=1024, num_warps=4),
           "row": dict(BLOCK_M=1, num_warps=8)}
for (m, k) in ((4096, 3072), (4608, 15360)):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    q = torch.empty((m, k), device="cuda", dtype=torch.int8)
    s = torch.empty((m,), device="cuda", dtype=torch.float32)
    common = dict(G=256, NORM=1 / 16, QMAX=7, PACK=False, SPLIT=True)  # contraction on, as the launcher runs them
    for method, cfg in CONFIGS.items():
        if method == "row" and k > tk.ROW_MAX_K:
            continue
        grid = (tk.triton_cdiv(m, cfg["BLOCK_M"]),)
        for _ in range(2):
            if method == "row":
                kp, thirds = tk.row_tiles(k, 256)
                j.rotate_quantize_row_kernel[grid](x, q, s, m, k, x.stride(0), q.stride(0), 0, **common,
                                                   KP=kp, THIRDS=thirds, **cfg)
            else:
                j.rotate_quantize_kernel[grid](x, h, q, s, m, k, x.stride(0), q.stride(0), 0, **common, HS=16,
                                               DOT_F32=False, FWHT=method == "fwht", **cfg)
        print(method, m, k, "ok")
torch.cuda.synchronize()
