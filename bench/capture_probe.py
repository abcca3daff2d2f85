"""Can torch.compile'd code be captured as a CUDA graph under the cudaMallocAsync allocator (ComfyUI's default)?

    python bench/capture_probe.py            # every case, each in a fresh process; one JSON line per case

A case compiles a small block (a ConvRot W4A4 linear between LayerNorm/GELU/residual work, or the same with bf16
linears), warms it up on a side stream, captures one call, replays it on fresh inputs and compares with the eager
result. Cases differ in allocator (cudaMallocAsync / native) and Inductor's wrapper (Python launchers, which check
every pointer with the driver, or `cpp_wrapper`, generated C++ that launches the kernels itself).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = [(alloc, cpp, layer) for alloc in ("cudaMallocAsync", "native") for cpp in (False, True)
         for layer in ("convrot", "bf16")]


def _case(alloc: str, cpp: bool, layer: str) -> dict:
    import torch
    sys.path.insert(0, str(REPO))
    from convrot.linear import ConvRotLinear

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    k, n, m = 3072, 3072, 4096
    w1, w2 = (torch.randn(n, k, device=dev, dtype=dt) / k ** 0.5 for _ in range(2))
    if layer == "convrot":
        l1, l2 = (ConvRotLinear.from_float(w, None, 256) for w in (w1, w2))
    else:
        l1, l2 = (lambda x, w=w: x @ w.t() for w in (w1, w2))

    def block(x, shift):
        h = torch.nn.functional.layer_norm(x, x.shape[-1:]) * 1.1 + shift
        h = torch.nn.functional.gelu(l1(h), approximate="tanh")
        return x + 0.5 * l2(h)

    t0 = time.time()
    fn = torch.compile(block, options={"cpp_wrapper": cpp})
    x = torch.randn(m, k, device=dev, dtype=dt)
    shift = torch.randn(k, device=dev, dtype=dt)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(x, shift)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    compile_s = time.time() - t0
    out = {"alloc": torch.cuda.get_allocator_backend(), "cpp_wrapper": cpp, "layer": layer,
           "compile_s": round(compile_s, 1)}
    # host time per call without a graph (small M would show it; here the block is also GPU work)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        fn(x, shift)
    torch.cuda.synchronize()
    out["eager_ms"] = round((time.perf_counter() - t) / 20 * 1e3, 3)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=side):
            y = fn(x, shift)
        graph.replay()
        x.copy_(torch.randn_like(x))
        shift.copy_(torch.randn_like(shift))
        graph.replay()
        torch.cuda.synchronize()
        ref = block(x, shift)
        out["captured"] = True
        out["rel_err_vs_eager"] = float((y.float() - ref.float()).norm() / ref.float().norm())
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        out["graph_ms"] = round((time.perf_counter() - t) / 20 * 1e3, 3)
    except Exception as e:  # noqa: BLE001 - the finding
        out["captured"] = False
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out


def main() -> None:
    if len(sys.argv) == 4:
        alloc, cpp, layer = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
        print(json.dumps(_case(alloc, cpp, layer)), flush=True)
        os._exit(0)  # a failed capture's buffers may not be freeable under cudaMallocAsync: skip teardown
    for alloc, cpp, layer in CASES:
        env = dict(os.environ)
        if alloc == "cudaMallocAsync":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
        else:
            env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        r = subprocess.run([sys.executable, __file__, alloc, "1" if cpp else "0", layer], env=env,
                           capture_output=True, text=True, timeout=600)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        print(lines[-1] if lines else json.dumps({"alloc": alloc, "cpp_wrapper": cpp, "layer": layer,
                                                  "rc": r.returncode, "stderr": r.stderr[-600:]}), flush=True)


if __name__ == "__main__":
    main()
