"""The pack measured where users run it: a real ComfyUI server (`python main.py`), over HTTP and the websocket.

    python bench/server_bench.py --comfy /path/to/ComfyUI [--modes default,disable-dynamic,...] [--variants ...]
    python bench/server_bench.py --comfy /path/to/ComfyUI --tiny --modes cpu      # the CPU twin (CI)

For every memory mode it starts ComfyUI's own `main.py` with that mode's flags (a second server with custom nodes
disabled for the `stock_native_nopack` row), queues API-format prompts of the FLUX.1-dev text-to-image workflow
(workflows/flux1_dev_text_to_image.json: FluxGuidance 3.5, euler/simple, 20 steps, 1024², batch 1) with fixed
conditioning tensors in place of the text encoders (a benchmark-only node, bench/server_nodes), and reads from the
websocket when each node starts and each sampling step ends. Per row: steady it/s (median step interval after the
first step), the time from the loader node's start to the next node's (load + quantize), the device's memory peak
while the prompt runs (cudaMemGetInfo through NVML, polled every 20 ms, whole device), and the final latent's
relative error against bf16 in the same mode and against bf16 in the default mode (SaveLatent files). Models are
unloaded (POST /free) between prompts so each row loads its own.

Weights: a FLUX.1-dev-size transformer (12B) with seeded random bf16 weights (bench/e2e_comfy.py writes it), a
rank-32 LoRA on every block linear, and a native ConvRot `mixed` file written by `python -m convrot quantize`;
`--tiny` uses a tiny model of the same layout (seconds on a CPU). Prints a markdown table; JSON lines to --out.
`--family` (FAMILY_RUNS) runs another family instead: random weights of ComfyUI's own full-size class
(bench/family_weights.py), that family's latent node and text width, FluxGuidance only where its template has it,
no LoRA rows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FLUX = "flux1-dev-random.safetensors"
NATIVE = "flux1-dev-random-convrot-mixed.safetensors"
# --family: what each family's graph needs in place of FLUX.1's, as ComfyUI's own templates build it
# (docs/build_workflows.py): text tokens, the empty-latent node, FluxGuidance or none. Every family samples at cfg 1
# (one model call per step) so that bf16 and ConvRot rows compare the same work; the templates' cfg > 1 doubles it
# for both. The text width comes from the family's model config (bench/family_weights.py context_width).
FAMILY_RUNS = {
    "flux1": dict(txt=256, latent="EmptySD3LatentImage", guidance=3.5),
    "flux2_dev": dict(txt=512, latent="EmptyFlux2LatentImage", guidance=4.0),
    "flux2_klein9b": dict(txt=512, latent="EmptyFlux2LatentImage", guidance=None),
    "flux2_klein4b": dict(txt=512, latent="EmptyFlux2LatentImage", guidance=None),
    "chroma": dict(txt=512, latent="EmptySD3LatentImage", guidance=None),
    "qwen_image": dict(txt=512, latent="EmptySD3LatentImage", guidance=None),
    "wan14b": dict(txt=512, latent="EmptyHunyuanLatentVideo", guidance=None,
                   video=dict(width=832, height=480, length=81), tiny_video=dict(width=64, height=64, length=5)),
}
LORA_FAMILIES = ("flux1",)  # the generated bench LoRA targets FLUX.1's block linears


def model_file(family: str, tiny: bool = False) -> str:
    name = FLUX if family == "flux1" else f"{family}-random.safetensors"
    return name.replace(".safetensors", "-tiny.safetensors") if tiny else name


def native_file(family: str, tiny: bool = False) -> str:
    return model_file(family, tiny).replace(".safetensors", "-convrot-mixed.safetensors")


LORA = "convrot-bench-rank32.safetensors"


def lora_file(tiny: bool = False) -> str:
    return LORA.replace(".safetensors", "-tiny.safetensors") if tiny else LORA
PACK_LINK = "ComfyUI-ConvRot"
BENCH_NODES = "convrot_bench_nodes"

# mode -> ComfyUI flags; "pressure" gets --reserve-vram computed from the device so the bf16 model cannot fit
MODES = {
    "default": [],
    "pressure": None,
    "disable-dynamic": ["--disable-dynamic-vram"],
    "lowvram": ["--lowvram"],
    "novram": ["--novram"],
    "highvram": ["--highvram"],
    "cpu": ["--cpu"],
    "native-alloc": ["--disable-cuda-malloc"],  # PyTorch's caching allocator instead of cudaMallocAsync
    "nostatic": [],   # default flags, Inductor's static CUDA launcher off (MODE_ENV)
    "triton": [],     # default flags, the pack's Triton route forced (what a user without nvcc gets)
    "dequant": [],    # default flags, the pack's dequantize-to-bf16 fallback route forced
    "nokernels": [],  # default flags, the CUDA extension never built: the automatic order without nvcc
    "cppwrap": [],    # default flags, Inductor's C++ wrapper (kernels launched without Triton's pointer checks)
}
# environment a mode adds to the server's (experiments a user could set the same way)
MODE_ENV = {
    "nostatic": {"TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER": "0"},
    "triton": {"CONVROT_ROUTE": "triton"},
    "dequant": {"CONVROT_ROUTE": "dequant"},
    "nokernels": {"CONVROT_DISABLE_KERNELS": "1"},
    "cppwrap": {"TORCHINDUCTOR_CPP_WRAPPER": "1"},
}
VARIANTS = ["bf16", "fp8_fast", "mixed", "mixed+eager", "compact", "mixed+lora", "stock_native",
            "stock_native_nopack"]
# also: PRESET+lr (the correction presets), +bypass (LoraLoaderBypassModelOnly), +graph (the CUDA Graph node)


# ---------------------------------------------------------------- prompts (API format)

def prompt_for(variant: str, cond: str, steps: int, res: int, prefix: str, family: str = "flux1",
               tiny: bool = False) -> dict:
    run = FAMILY_RUNS[family]
    if variant in ("bf16", "fp8_fast", "stock_native", "stock_native_nopack"):
        loader = {"class_type": "UNETLoader", "inputs": {
            "unet_name": native_file(family, tiny) if variant.startswith("stock_native") else model_file(family, tiny),
            "weight_dtype": "fp8_e4m3fn_fast" if variant == "fp8_fast" else "default"}}
    else:  # ConvRot loader; "+eager" sets its speed input to eager (default: auto), "+lr" picks PRESET+lr
        preset, *mods = variant.split("+")
        loader = {"class_type": "ConvRotW4A4Loader", "inputs": {
            "unet_name": model_file(family, tiny), "preset": preset + ("+lr" if "lr" in mods else ""),
            "group_size": "256", "overrides": "",
            "speed": "eager" if "eager" in mods else "auto"}}
    g = {"1": loader}
    model = ["1", 0]
    if "+lora" in variant or "+bypass" in variant:  # the stock LoRA loader, or ComfyUI's bypass LoRA loader
        g["2"] = {"class_type": "LoraLoaderModelOnly" if "+lora" in variant else "LoraLoaderBypassModelOnly",
                  "inputs": {"model": model, "lora_name": lora_file(tiny), "strength_model": 1.0}}
        model = ["2", 0]
    if "+graph" in variant:  # the CUDA Graph node after the loader (and LoRA): with +eager, uncompiled + graphs
        g["8"] = {"class_type": "ConvRotCUDAGraph", "inputs": {"model": model}}
        model = ["8", 0]
    g["3"] = {"class_type": "ConvRotBenchConditioning", "inputs": {"path": cond}}
    positive = ["3", 0]
    if run["guidance"] is not None:
        g["4"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": run["guidance"]}}
        positive = ["4", 0]
    size = run.get("tiny_video" if tiny else "video") or {"width": res, "height": res}
    g["5"] = {"class_type": run["latent"], "inputs": {**size, "batch_size": 1}}
    g["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": 0, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": positive, "negative": positive, "latent_image": ["5", 0], "denoise": 1.0}}
    g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": prefix}}
    return g


# ---------------------------------------------------------------- preparing the files

def prepare(work: Path, comfy: Path, tiny: bool, native: bool = True, family: str = "flux1") -> Path:
    import torch
    from safetensors.torch import save_file
    sys.path.insert(0, str(REPO / "bench"))
    import e2e_comfy

    models = work / "models"
    dm, loras = models / "diffusion_models", models / "loras"
    dm.mkdir(parents=True, exist_ok=True)
    loras.mkdir(parents=True, exist_ok=True)
    flux = dm / model_file(family, tiny)
    run = FAMILY_RUNS[family]
    cond = work / f"cond-{family}{'-tiny' if tiny else ''}.safetensors"
    tokens = 16 if tiny else run["txt"]
    if not flux.exists() and family == "flux1":
        e2e_comfy.write_random_flux(flux, tiny)
    elif family != "flux1" and not (flux.exists() and cond.exists()):
        # ComfyUI's own class of the family, weights and conditioning, in a child: this process stays off the GPU
        subprocess.run([sys.executable, str(REPO / "bench" / "family_weights.py"), family, str(flux),
                        "--cond", str(cond), "--tokens", str(tokens), *(["--tiny"] if tiny else [])], cwd=REPO,
                       check=True, env=dict(os.environ, COMFYUI_PATH=str(comfy)))
    if family in LORA_FAMILIES and not (loras / lora_file(tiny)).exists():
        e2e_comfy.write_random_lora(loras / lora_file(tiny), flux)
    native_path = dm / native_file(family, tiny)
    if native and not native_path.exists():  # only the stock_native rows read it
        t = time.time()
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        subprocess.run([sys.executable, "-m", "convrot", "quantize", str(flux), str(native_path), "--preset",
                        "mixed", "--device", dev], cwd=REPO, check=True)
        print(f"native file written in {time.time() - t:.0f} s", flush=True)
    if not cond.exists():  # FLUX.1: T5's width and CLIP's pooled vector, as bench/e2e_comfy.py's model takes them
        gen = torch.Generator().manual_seed(0)
        save_file({"cond": torch.randn(1, tokens, 4096, generator=gen),
                   "pooled": torch.randn(1, 768, generator=gen)}, str(cond))
    # the pack and the benchmark node, as custom nodes of this ComfyUI
    cn = comfy / "custom_nodes"
    cn.mkdir(exist_ok=True)
    for name, target in ((PACK_LINK, REPO), (BENCH_NODES, REPO / "bench" / "server_nodes")):
        link = cn / name
        if link.is_symlink() or link.exists():
            if link.resolve() == target.resolve():
                continue
            link.unlink()
        link.symlink_to(target, target_is_directory=True)
    (work / "extra_model_paths.yaml").write_text(
        f"convrot_bench:\n    base_path: {models}\n    diffusion_models: diffusion_models\n    loras: loras\n")
    return cond


# ---------------------------------------------------------------- device memory

class MemPoll:
    """The whole device's used memory (NVML, like nvidia-smi), polled every 20 ms between start() and stop()."""

    def __init__(self):
        self.h = None
        try:
            import pynvml
            pynvml.nvmlInit()
            idx = int(os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or 0)
            self.h, self._mem = pynvml.nvmlDeviceGetHandleByIndex(idx), pynvml.nvmlDeviceGetMemoryInfo
        except Exception:
            pass
        self.peak, self._run = 0, False

    def used(self) -> int:
        return self._mem(self.h).used if self.h is not None else 0

    def settle(self, floor: int | None, timeout: float = 10.0) -> float:
        """Wait until the used memory is back near `floor` (bytes used by the idle server before its first prompt;
        ComfyUI releases a freed model's pages lazily), at most `timeout` s; the GB used then."""
        if self.h is None:
            return 0.0
        t0 = time.time()
        now = self.used()
        while floor is not None and now > floor + 2**29 and time.time() - t0 < timeout:
            time.sleep(0.1)
            now = self.used()
        return now / 2**30

    def start(self):
        self.peak, self._run = self.used(), True
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while self._run:
            self.peak = max(self.peak, self.used())
            time.sleep(0.02)

    def stop(self) -> float:
        self._run = False
        time.sleep(0.05)
        return self.peak / 2**30


# ---------------------------------------------------------------- one server, several prompts

class Server:
    def __init__(self, comfy: Path, work: Path, flags: list[str], port: int, log: Path, no_pack: bool,
                 extra_env: dict | None = None):
        self.comfy, self.work, self.port, self.log = comfy, work, port, log
        self.idle_bytes: int | None = None  # device memory used once the server is up, before its first prompt
        fe = work / "frontend"
        fe.mkdir(exist_ok=True)
        (fe / "index.html").write_text("<html>benchmark server</html>")
        self.out_dir = work / "output"
        launcher = REPO / "bench" / "server_launch.py"
        cmd = [sys.executable, str(launcher), str(comfy / "main.py"), "--listen", "127.0.0.1", "--port", str(port),
               "--front-end-root", str(fe), "--output-directory", str(self.out_dir),
               "--extra-model-paths-config", str(work / "extra_model_paths.yaml"), "--disable-auto-launch",
               *flags]
        if no_pack:
            cmd += ["--disable-all-custom-nodes", "--whitelist-custom-nodes", BENCH_NODES]
        self.cmd = cmd
        self.logf = open(log, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(extra_env or {}))
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=self.logf, stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{port}"

    async def wait_ready(self, session, timeout: float):
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            try:
                async with session.get(f"{self.base}/system_stats") as r:
                    if r.status == 200:
                        return await r.json()
            except Exception:
                pass
            await asyncio.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout:.0f} s; see {self.log}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.logf.close()


async def run_prompt(session, ws, server: Server, graph: dict, client_id: str, mem: MemPoll, timeout: float):
    async with session.post(f"{server.base}/free", json={"unload_models": True, "free_memory": True}) as r:
        await r.read()
    await asyncio.sleep(1.0)
    idle = await asyncio.to_thread(mem.settle, server.idle_bytes)
    mem.start()
    t_queue = time.time()
    async with session.post(f"{server.base}/prompt", json={"prompt": graph, "client_id": client_id}) as r:
        body = await r.json()
    if "prompt_id" not in body:
        mem.stop()
        return {"error": f"refused: {json.dumps(body)[:600]}"}
    pid = body["prompt_id"]
    starts, steps, error = [], [], None
    deadline = t_queue + timeout
    while True:
        left = deadline - time.time()
        if left <= 0:
            error = f"timed out after {timeout:.0f} s"
            async with session.post(f"{server.base}/interrupt") as r:
                await r.read()
            break
        try:
            msg = await ws.receive(timeout=left)
        except asyncio.TimeoutError:
            continue
        if msg.type != 1:  # aiohttp.WSMsgType.TEXT; binary frames are previews
            if msg.type in (8, 256, 257, 258):  # close / closing / closed / error
                error = "websocket closed"
                break
            continue
        m = json.loads(msg.data)
        data = m.get("data", {})
        if data.get("prompt_id") not in (None, pid):
            continue
        now = time.time()
        if m["type"] == "executing" and data.get("node") is not None:
            starts.append((data["node"], now))
        elif m["type"] == "progress" and data.get("node") == "6":
            steps.append((data["value"], now))
        elif m["type"] == "execution_error":
            error = f"{data.get('exception_type')}: {data.get('exception_message', '')}"[:1500]
            break
        elif m["type"] in ("execution_success",) or (m["type"] == "executing" and data.get("node") is None
                                                      and data.get("prompt_id") == pid):
            break
    peak = mem.stop()
    res = {"prompt_id": pid, "wall_s": time.time() - t_queue, "peak_vram_gb": peak, "idle_vram_gb": idle,
           "nodes": [n for n, _ in starts]}
    if error:
        res["error"] = error
    order = [n for n, _ in starts]
    if "1" in order and order.index("1") + 1 < len(starts):
        i = order.index("1")
        res["load_s"] = starts[i + 1][1] - starts[i][1]
    res.update(step_rate(steps, starts[order.index("6")][1] if "6" in order else t_queue))
    return res


def convrot_path(log_text: str) -> str:
    """What the pack's log lines written during one prompt say about its speed path: compiled (with which
    launchers), CUDA graphs captured and replayed, or eager and why; "" where the pack said nothing (stock rows)."""
    import re
    # "ConvRot on cuda:0: <route>: ..." names the kernel route, whose description may say "eagerly" too
    lines = [ln for ln in log_text.splitlines() if "ConvRot" in ln and "ConvRot on " not in ln]
    parts = []
    if any("blocks will be compiled" in ln for ln in lines):
        parts.append("compiled" + (" (C++ wrapper)" if any("C++ wrapper" in ln for ln in lines) else ""))
    for ln in lines:
        m = re.search(r"(\d+) graph\(s\) captured, (\d+) steps replayed", ln)
        if m:
            parts.append(f"{m.group(1)} graph(s) captured, {m.group(2)} replayed")
        elif "eagerly" in ln or "not replayed" in ln or "run uncompiled" in ln:
            said = ln.split("ConvRot", 1)[1].split(":", 1)[-1].strip()[:160]
            label = "eager" if "eagerly" in ln else "uncompiled" if "run uncompiled" in ln else "not captured"
            parts.append(f"{label}: {said}")
    return "; ".join(dict.fromkeys(parts))


def step_rate(steps: list[tuple[int, float]], t_start: float) -> dict:
    """Seconds per step from the sampler's progress messages [(step value, arrival time)].

    ComfyUI sends the first and the last step always but the ones between at most every 100 ms, so faster steps
    arrive thinned out: the rate is steps done over time taken between two messages, never the median gap. The
    first step (warm-up, compiles) is left out: timing starts at the message of step 2 where one came, else 1."""
    seen = sorted(dict(steps).items())
    if not seen:
        return {}
    out = {"first_step_s": seen[0][1] - t_start}
    last_v, last_t = seen[-1]
    anchor = next(((v, t) for v, t in seen if v >= 2 and v < last_v), None) or \
        next(((v, t) for v, t in seen if v >= 1 and v < last_v), None)
    if anchor is not None and last_t > anchor[1]:
        out["s_per_it"] = (last_t - anchor[1]) / (last_v - anchor[0])
        out["it_s"] = 1.0 / out["s_per_it"]
    return out


def read_latent(out_dir: Path, prefix: str):
    from safetensors.torch import load_file
    files = sorted((out_dir / "latents").glob(f"{Path(prefix).name}_*.latent")) if (out_dir / "latents").exists() \
        else []
    files = files or sorted(out_dir.glob(f"{prefix}_*.latent"))
    return load_file(str(files[-1]))["latent_tensor"].float() if files else None


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


async def run_mode(mode: str, flags: list[str], variants: list[str], a, cond: Path, mem: MemPoll, rows: list):
    import aiohttp
    groups = [(False, [v for v in variants if v != "stock_native_nopack"]),
              (True, [v for v in variants if v == "stock_native_nopack"])]
    for no_pack, vs in groups:
        if not vs:
            continue
        tag = f"{mode}{'-nopack' if no_pack else ''}"
        log = Path(a.log_dir) / f"server-{tag}.log"
        env = MODE_ENV.get(mode, {})
        server = Server(Path(a.comfy), Path(a.workdir), flags, a.port, log, no_pack, env)
        print(f"== {tag}: {' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(server.cmd[2:])}", flush=True)
        try:
            async with aiohttp.ClientSession() as session:
                t0 = time.time()
                stats = await server.wait_ready(session, a.start_timeout)
                server.idle_bytes = mem.used() if mem.h is not None else None
                start_s = time.time() - t0
                cid = uuid.uuid4().hex
                async with session.ws_connect(f"{server.base}/ws?clientId={cid}", max_msg_size=0) as ws:
                    for v in vs:
                        prefix = f"bench/{tag}_{v.replace('+', '_')}_{uuid.uuid4().hex[:6]}"
                        graph = prompt_for(v, str(cond), a.steps, a.res, prefix, a.family, a.tiny)
                        log_at = server.log.stat().st_size if server.log.exists() else 0
                        r = await run_prompt(session, ws, server, graph, cid, mem, a.prompt_timeout)
                        with open(server.log, errors="replace") as f:
                            f.seek(log_at)
                            r["path"] = convrot_path(f.read())
                        r.update(mode=mode, variant=v, flags=" ".join([*(f"{k}={x}" for k, x in env.items()), *flags]),
                                 server_start_s=start_s, prefix=prefix,
                                 device=stats.get("devices", [{}])[0].get("name", "?"))
                        r["latent"] = read_latent(server.out_dir, prefix)
                        if a.keep_latents and r["latent"] is not None:
                            from safetensors.torch import save_file
                            d = Path(a.workdir) / "latents"
                            d.mkdir(exist_ok=True)
                            save_file({"latent": r["latent"].contiguous()},
                                      str(d / f"{prefix.replace('/', '_')}.safetensors"))
                        rows.append(r)
                        base = next((b["latent"] for b in rows if b.get("mode") == mode and b.get("variant") == "bf16"
                                     and b.get("latent") is not None), None)
                        if base is not None and r["latent"] is not None and v != "bf16":
                            r["latent_err"] = rel(r["latent"], base)
                        print(f"   {v}: " + ", ".join(f"{k}={r[k]:.3f}" if isinstance(r[k], float) else f"{k}={r[k]}"
                                                      for k in ("it_s", "load_s", "peak_vram_gb", "first_step_s",
                                                                "latent_err", "path", "error")
                                                      if k in r), flush=True)
                        if a.out:  # each row as soon as it is measured: a call that runs out of time keeps them
                            with open(Path(a.out).with_suffix(".partial.jsonl"), "a") as f:
                                f.write(json.dumps({k: x for k, x in r.items() if k != "latent"}) + "\n")
        except Exception as e:
            rows.append({"mode": mode, "variant": ",".join(vs), "flags": " ".join(flags),
                         "error": f"server: {type(e).__name__}: {e}"})
            print(f"   server failed: {e}", flush=True)
        finally:
            server.stop()


def idle_note(r: dict) -> str:
    """The device memory already in use when the prompt was queued (another model not yet released), where any."""
    idle = r.get("idle_vram_gb")
    return f" (idle {idle:.1f})" if idle is not None and idle >= 1.0 else ""


def table(rows: list, env: str) -> str:
    ref = {r["mode"]: r["latent"] for r in rows if r.get("variant") == "bf16" and r.get("latent") is not None}
    glob = ref.get("default")
    mixed_default = next((r["latent"] for r in rows if r.get("mode") == "default" and r.get("variant") == "mixed"
                          and r.get("latent") is not None), None)
    out = [env, "", "| mode | variant | it/s | vs bf16 (same mode, else default) | load s | "
           "peak VRAM GB (idle: in use when queued) | latent err vs bf16 (same mode, else default) | vs bf16 default | "
           "mixed vs mixed default | speed path (the pack's log) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    bf = {r["mode"]: r.get("it_s") for r in rows if r.get("variant") == "bf16"}
    for r in rows:
        lat = r.get("latent")
        f = lambda x, d=2: "–" if x is None else f"{x:.{d}f}"  # noqa: E731
        base_it = bf.get(r["mode"]) or bf.get("default")  # a mode without its own bf16 row: the default one
        base_lat = ref.get(r["mode"], glob)
        ratio = r["it_s"] / base_it if r.get("it_s") and base_it else None
        e_mode = rel(lat, base_lat) * 100 if lat is not None and base_lat is not None else None
        e_glob = rel(lat, glob) * 100 if lat is not None and glob is not None else None
        e_mix = rel(lat, mixed_default) * 100 if (lat is not None and mixed_default is not None
                                                  and r.get("variant") == "mixed") else None
        err = r.get("error")
        out.append(f"| {r['mode']} | {r['variant']} | {f(r.get('it_s'))} | "
                   f"{f(ratio) + 'x' if ratio else '–'} | {f(r.get('load_s'), 1)} | {f(r.get('peak_vram_gb'), 1)}"
                   f"{idle_note(r)} | "
                   f"{f(e_mode, 1) + '%' if e_mode is not None else '–'} | "
                   f"{f(e_glob, 1) + '%' if e_glob is not None else '–'} | "
                   f"{f(e_mix, 2) + '%' if e_mix is not None else ''}"
                   f"{' FAILED: ' + err.replace('|', '/')[:300] if err else ''} | {r.get('path') or ''} |")
    return "\n".join(out)


def environment(comfy: Path) -> str:
    import torch
    ver = (comfy / "comfyui_version.py").read_text().split('"')[1] if (comfy / "comfyui_version.py").exists() else "?"
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    pk = []
    for name in ("comfy_aimdo", "comfy_kitchen", "triton"):
        try:
            from importlib.metadata import version
            pk.append(f"{name} {version(name.replace('_', '-'))}")
        except Exception:
            pass
    return (f"device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); ComfyUI {ver} server "
            f"(main.py); {', '.join(pk)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfy", required=True)
    p.add_argument("--workdir", default="/tmp/convrot_server")
    p.add_argument("--modes", default="default")
    p.add_argument("--variants", default=None, help=f"default: {','.join(VARIANTS)} (without the LoRA rows for "
                   "families the bench LoRA does not fit)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--res", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="a tiny model of the family's layout (CPU twin, CI)")
    p.add_argument("--family", default="flux1", choices=sorted(FAMILY_RUNS),
                   help="the model family (random weights of its full-size ComfyUI class, bench/family_weights.py)")
    p.add_argument("--port", type=int, default=8388)
    p.add_argument("--start-timeout", type=float, default=180)
    p.add_argument("--prompt-timeout", type=float, default=300)
    p.add_argument("--pressure-budget-gb", type=float, default=7.0,
                   help="--reserve-vram leaves this much of the device to ComfyUI in the pressure mode")
    p.add_argument("--keep-latents", action="store_true", help="also write each final latent to WORKDIR/latents")
    p.add_argument("--out", default=None)
    p.add_argument("--log-dir", default=None)
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    a.log_dir = a.log_dir or str(work / "logs")
    Path(a.log_dir).mkdir(parents=True, exist_ok=True)
    comfy = Path(a.comfy).resolve()
    if a.variants is None:
        a.variants = ",".join(v for v in VARIANTS if a.family in LORA_FAMILIES or "+lora" not in v)
    variants = [v for v in a.variants.split(",") if v]
    wanted = variants + [v for m in a.modes.split(",") for v in m.partition("@")[2].split("|")]
    if a.family not in LORA_FAMILIES and any("+lora" in v or "+bypass" in v for v in wanted):
        p.error(f"--family {a.family}: the LoRA rows need {', '.join(LORA_FAMILIES)} (the bench LoRA's layers)")
    if a.tiny and a.family != "flux1":
        sys.path.insert(0, str(REPO / "bench"))
        import family_weights
        if a.family not in family_weights.TINY_DETECTABLE:
            p.error(f"--tiny --family {a.family}: ComfyUI detects this family's sizes as the real model's; tiny "
                    f"families: {', '.join(family_weights.TINY_DETECTABLE)}")
    cond = prepare(work, comfy, a.tiny, native=any(v.startswith("stock_native") for v in wanted), family=a.family)
    mem = MemPoll()
    rows: list = []
    for spec in [m for m in a.modes.split(",") if m]:
        mode, _, only = spec.partition("@")  # "pressure@bf16|mixed+eager": that mode with those variants only
        flags = MODES[mode]
        if flags is None:  # pressure: leave the budget only
            total = mem._mem(mem.h).total / 2**30 if mem.h is not None else 0
            flags = ["--reserve-vram", f"{max(total - a.pressure_budget_gb, 0):.1f}"]
        asyncio.run(run_mode(mode, flags, only.split("|") if only else variants, a, cond, mem, rows))
    run = FAMILY_RUNS[a.family]
    what = "FLUX.1-dev-size" if a.family == "flux1" else f"{a.family}-size"
    size = run.get("tiny_video" if a.tiny else "video")
    size = f"{size['width']}x{size['height']}x{size['length']}" if size else f"{a.res}²"
    guide = f"FluxGuidance {run['guidance']}" if run["guidance"] is not None else "no guidance node"
    text = table(rows, environment(comfy) + f"; {what} random weights{' (tiny)' if a.tiny else ''}, "
                       f"{size}, {a.steps} steps, euler/simple, cfg 1, {guide}")
    print(text, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "latent"}) + "\n")
        Path(a.out).with_suffix(".md").write_text(text + "\n")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
