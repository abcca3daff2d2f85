"""End-to-end FLUX.1-dev sampling inside ComfyUI on a GPU: stock bf16, stock fp8_e4m3fn_fast, ConvRot presets.

    python bench/e2e_comfy.py --comfy /path/to/ComfyUI [--steps 20] [--res 1024] [--variants bf16,fp8_fast,mixed]

A variant is a loader (bf16, fp8_fast, or a ConvRot preset) with optional modifiers: `+lora` chains the stock
LoraLoaderModelOnly with a generated rank-32 LoRA on every block linear, `+lora_exact` the same with folding off
(CONVROT_FOLD_LORA=0), `+compile` adds ConvRot Compile Blocks, `+graph` ConvRot CUDA Graph (last, as a user would
chain it); e.g. `mixed+lora+compile+graph`. A `+graph` variant's final latent is also compared with the same variant
without `+graph` when that ran too (a replayed step must compute what the eager step computes); `+rep` repeats a
variant in a new process and compares the latents (run-to-run determinism).

A FLUX.1-dev-size transformer (12B) with seeded random bf16 weights is written once to a work folder (no weights can
be downloaded); conditioning tensors stand in for the text encoders. Each variant runs in its own process so load
time and peak VRAM are its own: load (+quantize) time, median seconds per step (CUDA-synchronized wall time of each
transformer call), peak VRAM, transformer weight bytes. `--profile` adds a torch-profiler breakdown of one step
(the 6th, after compilation and capture; left out of the median).
Prints a markdown table and writes JSON lines to --out.

The GPU machine has no internet: carry a ComfyUI source tree (its tokenizer data folders can be left out) and
wheels of the ComfyUI requirements it lacks (torchsde, trampoline, alembic, mako, sqlalchemy, greenlet, comfy-aimdo,
simpleeval, blake3, einops, pydantic-settings, python-dotenv, comfy-kitchen for the fp8 variant, nvidia-cutlass for
the sm_90 build); `av` is stubbed when missing. `--tiny` runs the whole flow on a tiny model, CPU included.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# ---------------------------------------------------------------- the 12B random checkpoint

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def write_random_flux(path: Path, tiny: bool, seed: int = 0) -> None:
    """FLUX.1-dev shapes and names, weights ~ N(0, 1/fan_in) generated on the GPU, written tensor by tensor."""
    from convrot.checkpoint import StreamingWriter, TensorInfo
    from convrot.flux import Flux, FluxConfig

    with torch.device("meta"):
        model = Flux(FluxConfig.tiny(vec=768, ctx=4096) if tiny else FluxConfig())
    specs = {n: TensorInfo(torch.bfloat16, tuple(p.shape)) for n, p in model.state_dict().items()}
    gen = torch.Generator(device=DEV).manual_seed(seed)
    t0 = time.time()
    with StreamingWriter(str(path), specs, {"note": "seeded random FLUX.1-dev-size weights for benchmarks"}) as w:
        for name, info in specs.items():
            if name.endswith(".scale"):
                t = 1 + 0.1 * torch.randn(info.shape, generator=gen, device=DEV)
            elif len(info.shape) == 2:
                t = torch.randn(info.shape, generator=gen, device=DEV) / math.sqrt(info.shape[1])
                if "mod" in name or "adaLN" in name:
                    t *= 0.3
            else:
                t = 0.02 * torch.randn(info.shape, generator=gen, device=DEV)
            w.write(name, t.to(torch.bfloat16))
    print(f"wrote {path} ({path.stat().st_size / 1e9:.1f} GB) in {time.time() - t0:.0f}s", flush=True)


LORA_NAME = "convrot-bench-rank32.safetensors"


def write_random_lora(path: Path, unet: Path, rank: int = 32, seed: int = 1) -> None:
    """A rank-`rank` LoRA in ComfyUI's format on every linear of every FLUX block (all layers ConvRot quantizes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with safe_open(str(unet), "pt") as f:
        for k in f.keys():
            if k.endswith(".weight") and k.startswith(("double_blocks.", "single_blocks.")):
                shape = f.get_slice(k).get_shape()
                if len(shape) != 2:
                    continue
                n, kk = shape
                stem = "diffusion_model." + k[:-len(".weight")]
                out[stem + ".lora_down.weight"] = (torch.randn(rank, kk, generator=gen) / math.sqrt(kk)).to(torch.bfloat16)
                out[stem + ".lora_up.weight"] = (0.05 * torch.randn(n, rank, generator=gen) / math.sqrt(rank)).to(torch.bfloat16)
                out[stem + ".alpha"] = torch.tensor(float(rank))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path))
    print(f"wrote {path} ({len(out) // 3} layers, rank {rank})", flush=True)


# ---------------------------------------------------------------- one variant, in its own process

_NODES = None


def import_comfy(comfy_path: str, models_dir: Path):
    global _NODES
    if _NODES is not None:
        return _NODES
    import importlib.util
    spec = importlib.util.spec_from_file_location("convrot_comfy_env", REPO / "tests" / "comfy_env.py")
    env = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(env)
    sys.path.insert(0, comfy_path)
    for name in ("av", "torchvision", "torchaudio"):  # optional for this headless run; stubbed only if broken
        env._stub_if_broken(name)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    if DEV == "cpu":  # a dry run of the whole flow on a machine without a GPU
        import comfy.cli_args
        comfy.cli_args.args.cpu = True
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", str(models_dir), is_default=True)
    folder_paths.add_model_folder_path("loras", str(models_dir / "loras"), is_default=True)
    import comfy.model_management  # noqa: F401
    import comfy.sd  # noqa: F401
    import nodes
    _NODES = nodes
    return nodes


def peak_memory() -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if DEV == "cuda" else float("nan")


def run_variant(a) -> dict:
    models_dir = Path(a.workdir)
    nodes = import_comfy(a.comfy, models_dir)
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base, *mods = a.variant.split("+")  # e.g. mixed+lora+compile; lora_exact: the LoRA as a separate branch
    if "lora_exact" in mods:
        os.environ["CONVROT_FOLD_LORA"] = "0"
        mods.append("lora")
    t0 = time.time()
    if base == "bf16":
        model = nodes.UNETLoader().load_unet(a.unet, "default")[0]
    elif base == "fp8_fast":
        model = nodes.UNETLoader().load_unet(a.unet, "fp8_e4m3fn_fast")[0]
    else:
        from nodes_pack import loader  # noqa: F401  (set up by main: the pack imported as a package)
        model = loader.load_convrot_model(str(models_dir / a.unet), base, 256, "", progress=False)
    t_load_cpu = time.time() - t0
    if "lora" in mods:  # the stock node, as a user chains it
        model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, LORA_NAME, 1.0)[0]
    if "compile" in mods:
        from nodes_pack import compile as pack_compile
        model = pack_compile.compile_blocks(model)
    if "graph" in mods:
        from nodes_pack import graph as pack_graph
        model = pack_graph.graph_model(model)

    import comfy.model_management as mm
    t0 = time.time()
    mm.load_models_gpu([model], force_full_load=True)
    sync()
    t_to_gpu = time.time() - t0
    dm = model.model.diffusion_model
    weight_bytes = sum(t.numel() * t.element_size() for t in list(dm.parameters()) + list(dm.buffers()))

    times = []
    profiled = {}
    prof_call = 5 if a.profile and DEV == "cuda" else None  # a step after compilation / capture

    def timed(apply_model, args):
        from torch.profiler import ProfilerActivity, profile
        sync()
        prof = profile(activities=[ProfilerActivity.CUDA]) if len(times) == prof_call and not profiled else None
        if prof is not None:
            prof.__enter__()
        s = time.perf_counter()
        out = apply_model(args["input"], args["timestep"], **args["c"])
        sync()
        t = time.perf_counter() - s
        if prof is None:
            times.append(t)
        else:  # not in the median: the profiler slows the host down
            prof.__exit__(None, None, None)
            profiled.update(step_breakdown(prof), wall_ms=round(t * 1e3, 1))
        return out

    model = model.clone()
    model.set_model_unet_function_wrapper(timed)
    h = w = a.res // 8
    gen = torch.Generator().manual_seed(0)
    txt_len = 512 if a.res >= 512 else 16
    cond = [[torch.randn(1, txt_len, 4096, generator=gen),
             {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5}]]
    latent = {"samples": torch.zeros(1, 16, h, w)}
    t0 = time.time()
    out = nodes.common_ksampler(model, 0, a.steps, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]
    sync()
    t_sample = time.time() - t0
    torch.save(out.float().cpu(), models_dir / f"latent_{a.variant}.pt")  # compared with bf16's by the driver
    res = {
        "variant": a.variant, "first_step_s": round(times[0], 2), "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
        "cuda": torch.version.cuda, "res": a.res, "steps": a.steps,
        "load_s": round(t_load_cpu, 2), "to_gpu_s": round(t_to_gpu, 2),
        "step_median_s": round(statistics.median(times[1:] or times), 4), "steps_timed": len(times),
        "sample_s": round(t_sample, 2), "peak_vram_gb": round(peak_memory(), 2),
        "weight_gb": round(weight_bytes / 1e9, 2), "latent_std": round(float(out.float().std()), 4),
        "latent_finite": bool(torch.isfinite(out).all()),
    }
    if "graph" in mods:
        run = pack_graph.run_graphs(model).last  # (pack_graph imported where the node was applied)
        res["graph"] = {"captures": run.captures, "replays": run.replays, "eager": run.eager,
                        "disabled": run.disabled}
    if profiled:
        res["profile"] = profiled
    return res


def step_breakdown(prof) -> dict:
    """Share of CUDA time by kind over one profiled transformer call (CUDA-graph replays included)."""
    kinds = {"convrot gemm": 0.0, "convrot activation quant": 0.0, "attention": 0.0, "other gemm": 0.0,
             "other": 0.0}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t <= 0 or e.key.startswith(("aten::", "cuda")):  # CPU-side ops and runtime calls, not GPU work
            continue
        k = e.key.lower()
        # our GEMMs are CUTLASS device kernels or the mma.sync kernel; cuBLAS (the bf16 layers) names its own
        if "cutlass" in k or "gemm_s4" in k or ("convrot" in k and "gemm" in k):
            kinds["convrot gemm"] += t
        elif "convrot" in k:
            kinds["convrot activation quant"] += t
        elif "flash" in k or "fmha" in k or "attention" in k or "sdpa" in k:
            kinds["attention"] += t
        elif "gemm" in k or "nvjet" in k or "xmma" in k or "gemv" in k:
            kinds["other gemm"] += t
        else:
            kinds["other"] += t
    total = sum(kinds.values()) or 1.0
    top = sorted(((getattr(e, "device_time_total", 0) or 0, e.key) for e in prof.key_averages()), reverse=True)[:12]
    return {"share": {k: round(v / total, 3) for k, v in kinds.items()}, "total_ms": round(total / 1e3, 1),
            "top_kernels": [[k[:90], round(t / 1e3, 2)] for t, k in top]}


# ---------------------------------------------------------------- driver

def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--comfy", required=True)
    p.add_argument("--workdir", default="/tmp/convrot_e2e")
    p.add_argument("--unet", default="flux1-dev-random.safetensors")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--variants", default="bf16,fp8_fast,mixed,compact")
    p.add_argument("--profile", default="bf16,mixed,compact", help="variants to profile one step of ('' for none)")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny model: a dry run of the flow, on CPU too")
    p.add_argument("--log-dir", default=None, help="keep each variant's stderr there (<variant>.log)")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.variant:  # child process
        a.profile = a.variant in a.profile.split(",")
        # import the pack as a package the way ComfyUI does, under a name without a hyphen
        import importlib
        import importlib.util
        spec = importlib.util.spec_from_file_location("nodes_pack_root", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["nodes_pack_root"] = mod
        import_comfy(a.comfy, Path(a.workdir))
        spec.loader.exec_module(mod)
        sys.modules["nodes_pack"] = importlib.import_module("nodes_pack_root.nodes")
        print("RESULT " + json.dumps(run_variant(a)), flush=True)
        return 0

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / a.unet).exists():
        write_random_flux(work / a.unet, a.tiny)
    if "lora" in a.variants and not (work / "loras" / LORA_NAME).exists():
        write_random_lora(work / "loras" / LORA_NAME, work / a.unet)
    rows = []
    for v in a.variants.split(","):
        t0 = time.time()
        cmd = [sys.executable, __file__, "--comfy", a.comfy, "--workdir", a.workdir, "--unet", a.unet,
               "--steps", str(a.steps), "--res", str(a.res), "--profile", a.profile, "--variant", v]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if a.log_dir:
            Path(a.log_dir, v.replace("+", "_") + ".log").write_text(r.stderr[-2_000_000:])
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode or not lines:
            print(f"variant {v} failed ({time.time() - t0:.0f}s):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}", flush=True)
            continue
        res = json.loads(lines[-1][len("RESULT "):])
        rows.append(res)
        print(json.dumps(res), flush=True)
        if a.out:
            with open(a.out, "a") as f:
                f.write(json.dumps(res) + "\n")
    base = next((r for r in rows if r["variant"] == "bf16"), None)
    ref = work / "latent_bf16.pt"
    ran = {r["variant"] for r in rows}  # latents of this invocation only (the work folder keeps older ones)
    for r in rows:  # end-to-end deviation of the final latent from bf16's (same seed and conditioning)
        mine = work / f"latent_{r['variant']}.pt"
        if "bf16" in ran and ref.exists() and mine.exists():
            x, y = torch.load(ref, weights_only=True), torch.load(mine, weights_only=True)
            r["latent_rel_err_vs_bf16"] = round(float((y - x).norm() / x.norm()), 4)
        # `+graph`: vs the same variant without it; `+rep` (a repeat in a new process): vs the first one
        for mod, key in (("+graph", "latent_rel_err_vs_eager"), ("+rep", "latent_rel_err_vs_first")):
            other_name = r["variant"].replace(mod, "")
            other = work / f"latent_{other_name}.pt"
            if mod in r["variant"] and other_name in ran and mine.exists() and other.exists():
                x, y = torch.load(other, weights_only=True), torch.load(mine, weights_only=True)
                r.setdefault("compare", {})[key] = float((y - x).norm() / x.norm())
    print(f"\nFLUX.1-dev-size (random weights) in ComfyUI, {a.res}x{a.res}, {a.steps} steps, batch 1, "
          f"{rows[0]['device'] if rows else '?'}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    print("| variant | load (+quantize) s | to GPU s | first step s | s/it (median) | it/s vs bf16 | peak VRAM GB | "
          "weights GB | weights vs bf16 | latent rel. err vs bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        speed = base["step_median_s"] / r["step_median_s"] if base else float("nan")
        size = base["weight_gb"] / r["weight_gb"] if base else float("nan")
        print(f"| {r['variant']} | {r['load_s']} | {r['to_gpu_s']} | {r['first_step_s']} | {r['step_median_s']} | "
              f"{speed:.2f}x | {r['peak_vram_gb']} | {r['weight_gb']} | {size:.2f}x | "
              f"{r.get('latent_rel_err_vs_bf16', '')} |")
    for r in rows:
        if "graph" in r or "compare" in r:
            print(f"{r['variant']}: CUDA graph {r.get('graph')}, latent {r.get('compare')}")
    for r in rows:
        if "profile" in r:
            print(f"\nprofile of one step ({r['variant']}): {json.dumps(r['profile'], indent=1)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
