"""CPU-side build check: every CUDA source compiles with nvcc for each target architecture (no GPU needed).

Skipped when nvcc or PyTorch's C++ headers are absent. Compiles run 2 at a time (the CI machine has 2 cores).
What is compiled mirrors convrot.kernels.build_flags: the CUTLASS sm_90 GEMM TUs are real code only for
sm_90a and stubs elsewhere; only gemm_sm90_bf16_big.cu is compiled by default (the other eight are the same
template with another output type or tile shape; CONVROT_BUILD_TEST_ALL=1 compiles them too).
Measured on the 2-core CPU machine: about 4 minutes in all, most of it the CUTLASS TU (~95 s, ~5 GB RAM).
sm_120 is compiled for information only: a failure there is reported as a skip, not an error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
ARCHS = [(8, 0), (8, 6), (8, 9), (9, 0), (12, 0)]


def _nvcc():
    from torch.utils import cpp_extension

    cands = [shutil.which("nvcc")]
    if cpp_extension.CUDA_HOME:
        cands.append(str(Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc"))
    for c in cands:
        if c and Path(c).exists():
            return c
    return None


def _include_flags():
    from torch.utils import cpp_extension

    dirs = list(cpp_extension.include_paths(device_type="cuda")) + [sysconfig.get_paths()["include"]]
    # CUDA library headers (cusparse.h, cublas_v2.h) that PyTorch's headers include may come from the
    # nvidia-* wheels rather than the toolkit.
    import site

    for sp in site.getsitepackages() + [site.getusersitepackages()]:
        for inc in Path(sp).glob("nvidia/*/include"):
            dirs.append(str(inc))
    return [f"-I{d}" for d in dirs]


def _std_flag():
    from torch.utils import cpp_extension

    aten = Path(cpp_extension.include_paths()[0]) / "ATen" / "ATen.h"
    try:
        needs20 = "C++20" in aten.read_text()
    except OSError:
        needs20 = False
    return "-std=c++20" if needs20 else "-std=c++17"


def _jobs():
    from convrot.kernels import build_flags, cutlass_include_dirs

    jobs = []
    cut = cutlass_include_dirs()
    from convrot.kernels import SOURCES_SM90

    # One CUTLASS TU by default: the nine share one template and differ in output type and tile shape only.
    heavy = list(SOURCES_SM90) if os.environ.get("CONVROT_BUILD_TEST_ALL") else ["gemm_sm90_bf16_big.cu"]
    for cc in ARCHS:
        _, nvcc_flags, _ = build_flags(cc, cut)
        nvcc_flags = [f for f in nvcc_flags if not f.startswith("-std=")] + [_std_flag()]
        light = ["rotate_quant.cu", "gemm_mma_s4.cu"]
        if cc == (9, 0):
            if cut is None:
                continue
            srcs = light + heavy
        elif cc == (8, 0):
            srcs = light + ["gemm_sm90_bf16_big.cu"]  # the stub, once: it has no device code
        else:
            srcs = light
        for s in srcs:
            jobs.append((cc, s, nvcc_flags))
    # Longest first so the CUTLASS TU overlaps with the rest.
    jobs.sort(key=lambda j: not j[1].startswith("gemm_sm90") or j[0] != (9, 0))
    return jobs


def test_compile_all_sources(tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (no CUDA toolkit on this machine)")
    try:
        inc = _include_flags()
    except Exception as e:
        pytest.skip(f"PyTorch C++ headers unavailable: {e}")
    jobs = _jobs()
    from convrot.kernels import cutlass_include_dirs

    def run(job):
        cc, src, flags = job
        out = tmp_path / f"{src}.sm{cc[0]}{cc[1]}.o"
        cmd = [nvcc, "-c", str(CSRC / src), "-o", str(out), *flags, *inc, "-Xptxas", "-warn-spills"]
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        return cc, src, p.returncode, time.time() - t0, p.stderr[-3000:]

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=2) as ex:
        results = list(ex.map(run, jobs))
    total = time.time() - t0
    failures, sm120 = [], []
    for cc, src, rc, dt, err in results:
        print(f"sm_{cc[0]}{cc[1]} {src}: {'ok' if rc == 0 else 'FAILED'} in {dt:.0f} s")
        if rc != 0:
            (sm120 if cc == (12, 0) else failures).append(f"sm_{cc[0]}{cc[1]} {src}:\n{err}")
    print(f"total {total:.0f} s for {len(jobs)} compiles, 2 at a time")
    assert not failures, "\n\n".join(failures)
    if cutlass_include_dirs() is None:
        pytest.skip("compiled everything except the sm_90 CUTLASS GEMM: pip install nvidia-cutlass==4.2.0.0")
    if sm120:
        pytest.skip("all required targets built; sm_120 did not: " + "\n".join(sm120)[:2000])


def test_ops_cpp_syntax():
    """The host-only registration TU (g++ through PyTorch's flags), syntax only: quick."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    try:
        inc = _include_flags()
    except Exception as e:
        pytest.skip(f"PyTorch C++ headers unavailable: {e}")
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no CUDA toolkit headers")
    home = Path(cpp_extension.CUDA_HOME)
    cands = [home / "include", home / "cuda" / "include", Path("/usr/local/cuda/include")]
    found = [c for c in cands if (c / "cuda_runtime_api.h").is_file() and (c / "crt" / "host_defines.h").is_file()]
    if not found:
        pytest.skip("CUDA runtime headers not found")
    cuda_inc = f"-I{found[0]}"
    for defs in ([], ["-DCONVROT_SM90"]):
        p = subprocess.run([cxx, "-fsyntax-only", _std_flag(), *defs, cuda_inc, *inc, str(CSRC / "ops.cpp")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
