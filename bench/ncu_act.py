"""Profile target for Nsight Compute: the activation kernel at FLUX shapes (run under ncu by bench/gpu_run.sh)."""
import torch

from convrot import kernels

kernels.load()
for (m, k) in ((4608, 3072), (4608, 15360)):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.ops.convrot.rotate_quantize_i8(x, 256)
        torch.ops.convrot.rotate_quantize(x, 256)
torch.cuda.synchronize()
