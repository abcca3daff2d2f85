"""The CPU twin of the GPU server harness: a real `python main.py --cpu` ComfyUI server with the pack installed,
driven over HTTP and the websocket by bench/server_bench.py on a tiny FLUX-layout model.

It checks what the GPU table relies on: every prompt of the harness runs in a stock server (stock bf16, the ConvRot
loader, a stock LoRA node after it, stock "Load Diffusion Model" on a native ConvRot file with and without the pack)
and the latents agree: the stock loader on our saved file computes what our loader computes (the same ConvRot codes
on the same kernels), the ConvRot rows stay within the quantization error of bf16, and the LoRA moves the output.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_env import REPO, _not_found_reason, comfyui_path


def run_harness(work, port: int, *args: str):
    """bench/server_bench.py on a tiny model in a `--cpu` server in `work`: (rows by variant, stdout + server logs)."""
    comfy = comfyui_path()
    if comfy is None:
        pytest.skip(_not_found_reason())
    out = work / "rows.jsonl"
    cmd = [sys.executable, str(REPO / "bench" / "server_bench.py"), "--comfy", str(comfy), "--tiny", "--modes", "cpu",
           "--res", "64", "--workdir", str(work), "--out", str(out), "--port", str(port), "--keep-latents", *args]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    logs = "\n".join(p.read_text()[-3000:] for p in sorted((work / "logs").glob("*.log")))
    assert out.exists(), f"harness failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{logs}"
    rows = {row["variant"]: row for row in map(json.loads, out.read_text().splitlines())}
    return rows, r.stdout + logs


@pytest.fixture(scope="module")
def server_rows(tmp_path_factory):
    work = tmp_path_factory.mktemp("server")
    rows, log = run_harness(work, 8391, "--steps", "3", "--variants",
                            "bf16,mixed,mixed+lora,mixed+bypass,mixed+lr,stock_native,stock_native_nopack")
    return rows, work, log


def _latent(work, row):
    import torch
    from safetensors.torch import load_file
    return load_file(str(work / "latents" / f"{row['prefix'].replace('/', '_')}.safetensors"))["latent"].to(torch.float32)


def test_every_prompt_runs_in_a_cpu_server(server_rows):
    rows, _, log = server_rows
    assert set(rows) == {"bf16", "mixed", "mixed+lora", "mixed+bypass", "mixed+lr", "stock_native",
                         "stock_native_nopack"}
    for v, row in rows.items():
        assert "error" not in row, (v, row["error"], log[-3000:])
        assert row.get("it_s", 0) > 0 and row.get("load_s", 0) > 0, (v, row)
    # the speed path read from the pack's own log lines during each prompt: on a CPU server, eager, saying why
    assert rows["mixed"]["path"].startswith("eager") and "cpu" in rows["mixed"]["path"], rows["mixed"]["path"]
    assert rows["bf16"]["path"] == "", rows["bf16"]["path"]


def test_server_latents_agree(server_rows):
    rows, work, _ = server_rows
    lat = {v: _latent(work, r) for v, r in rows.items()}
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # stock "Load Diffusion Model" on our native file runs the same ConvRot codes through the same core
    assert rel(lat["stock_native"], lat["mixed"]) < 1e-3
    assert rel(lat["mixed"], lat["bf16"]) < 0.15       # quantization error, not a broken model
    assert rel(lat["stock_native_nopack"], lat["bf16"]) < 0.15  # comfy-kitchen's own path on the same file
    assert rel(lat["mixed+lora"], lat["mixed"]) > 0.005  # the LoRA reached the quantized layers
    # ComfyUI's bypass LoRA loader on our quantized layers: the same LoRA, the same result as the stock loader's
    assert rel(lat["mixed+bypass"], lat["mixed+lora"]) < 0.02 < rel(lat["mixed+bypass"], lat["mixed"]) * 4
    # the correction preset: closer to bf16 than the plain preset
    assert rel(lat["mixed+lr"], lat["bf16"]) < rel(lat["mixed"], lat["bf16"])


@pytest.mark.parametrize("family", ["flux2_klein4b", "wan14b"])
def test_other_families_run_in_a_cpu_server(tmp_path, family):
    """`--family`: ComfyUI's own class of the family with random weights, the family's latent node, no FluxGuidance;
    the stock loader and ours in one stock server, and the stock loader on our saved file computes what ours does."""
    rows, logs = run_harness(tmp_path, 8392, "--family", family, "--steps", "2",
                             "--variants", "bf16,mixed,stock_native")
    assert set(rows) == {"bf16", "mixed", "stock_native"}
    for v, row in rows.items():
        assert "error" not in row, (v, row["error"], logs[-3000:])
        assert row.get("it_s", 0) > 0, (v, row)
    lat = {v: _latent(tmp_path, row) for v, row in rows.items()}
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert lat["bf16"].dim() == (5 if family == "wan14b" else 4)  # the family's own latent node ran
    assert rel(lat["stock_native"], lat["mixed"]) < 1e-3
    assert 0 < rel(lat["mixed"], lat["bf16"]) < 0.15
    sys.path.insert(0, str(REPO / "bench"))
    import server_bench
    graph = server_bench.prompt_for("mixed", "c", 2, 64, "p", family, tiny=True)
    assert "FluxGuidance" not in {n["class_type"] for n in graph.values()}  # neither family's template has it
    assert graph["5"]["class_type"] == ("EmptyHunyuanLatentVideo" if family == "wan14b" else "EmptyFlux2LatentImage")


def test_speed_path_column_reads_the_packs_log_lines():
    """The table's speed-path column comes from the pack's own log lines (lines as the S19 server wrote them)."""
    sys.path.insert(0, str(REPO / "bench"))
    import server_bench
    log = "\n".join([
        "[INFO] ConvRot: 57 blocks will be compiled with torch.compile(inductor, C++ wrapper) on the first step",
        "[INFO] ConvRot CUDA Graph: 1 graph(s) captured, 19 steps replayed, 1 eager",
        "[INFO] some other node: nothing of ours"])
    assert server_bench.convrot_path(log) == "compiled (C++ wrapper); 1 graph(s) captured, 19 replayed"
    got = server_bench.convrot_path("[WARNING] ConvRot CUDA Graph: running eagerly for the rest of this run: "
                                    "img_in.bias is not on the GPU (low-VRAM offloading)")
    assert got.startswith("eager: ") and "img_in.bias" in got
    got = server_bench.convrot_path("[WARNING] ConvRot: compiling the blocks failed (BackendCompilerFailed: x); "
                                    "this model's steps run uncompiled from now on (slower; the same result)")
    assert got.startswith("uncompiled: ") and "BackendCompilerFailed" in got
    got = server_bench.convrot_path("[INFO] ConvRot: blocks are compiled; under cudaMallocAsync steps are not "
                                    "replayed as CUDA graphs (no C++ compiler)")
    assert got.startswith("not captured: ")
    assert server_bench.convrot_path("[INFO] got prompt") == ""
    assert server_bench.convrot_path("[WARNING] ConvRot on cuda:0: dequant: weight-only fallback, slower than bf16 "
                                     "eagerly [CONVROT_ROUTE=dequant]") == ""  # the route line is not the path
