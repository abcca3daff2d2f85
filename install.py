"""Build the ConvRot CUDA kernels ahead of time (ComfyUI-Manager runs install.py after cloning a node pack).

The kernels otherwise compile on first use. Building needs nvcc matching PyTorch's CUDA, ninja, and for H100/H200
(sm_90) the CUTLASS headers from `pip install nvidia-cutlass==4.2.0.0`. Never fails the install: without a GPU, a
toolkit or on an unsupported architecture it says why and ConvRot runs its PyTorch path.
"""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import torch
    except ImportError:
        print("convrot install: PyTorch not importable; nothing to build")
        return 0
    if not torch.cuda.is_available():
        print("convrot install: no CUDA GPU visible; the kernels will build on first use on a GPU machine")
        return 0
    from convrot import kernels

    t0 = time.time()
    ops = kernels.load(verbose="-v" in sys.argv)
    if ops is None:
        print(f"convrot install: CUDA kernels not built: {kernels.unavailable_reason()} (the PyTorch path still works)")
        return 0
    print(f"convrot install: CUDA kernels ready for {torch.cuda.get_device_name()} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
