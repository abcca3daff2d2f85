"""Screenshot a workflow in the real ComfyUI frontend (headless Chromium) for the README: docs/workflow.png.

    python docs/render_workflow.py [--comfyui PATH] [--workflow workflows/flux1_dev_text_to_image.json]
                                   [--out docs/workflow.png] [--all DIR] [--thumbnails]

Starts ComfyUI on CPU in a throw-away base directory (this repo linked in as custom node pack, empty placeholder
model files under the names the workflows pick), opens the frontend in headless Chromium through the DevTools
protocol, loads the workflow with `app.loadGraphData`, switches to focus mode, fits the view and saves a PNG cropped
to the graph. Needs `chromium` on PATH, aiohttp and Pillow (both ComfyUI requirements). Everything started is
stopped at the end; nothing outside the temporary directory is written except the PNG(s).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ComfyUI started through the pack's own CPU launcher (tools/run_comfy_cpu.py: torchvision/torchaudio stubbed only
# where they cannot load against a CPU-only torch)
LAUNCHER = os.path.join(REPO, "tools", "run_comfy_cpu.py")

# the model folder each loader's file combos list (the placeholder files are named after the workflows' choices)
FOLDERS = {"ConvRotW4A4Loader": "diffusion_models", "UNETLoader": "diffusion_models", "CLIPLoader": "text_encoders",
           "DualCLIPLoader": "text_encoders", "VAELoader": "vae", "LoraLoaderModelOnly": "loras"}


def placeholders(workflow_paths) -> list[str]:
    """models/<folder>/<file> for every model file a workflow picks, so the frontend shows it as present."""
    out = set()
    for path in workflow_paths:
        with open(path, encoding="utf-8") as f:
            for node in json.load(f).get("nodes", []):
                folder = FOLDERS.get(node.get("type"))
                for v in node.get("widgets_values") or []:
                    if folder and isinstance(v, str) and v.endswith(".safetensors"):
                        out.add(f"{folder}/{v}")
    return sorted(out)


SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}

# Bounds of all nodes and groups, in screen pixels, after fitting the view.
BOUNDS_JS = """(() => {
  const ds = window.app.canvas.ds, g = window.app.graph;
  let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
  const add = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); };
  for (const n of g._nodes) add(n.pos[0], n.pos[1] - 32, n.size[0], n.size[1] + 32);
  for (const gr of (g._groups || g.groups || [])) add(gr._bounding ? gr._bounding[0] : gr.pos[0],
      gr._bounding ? gr._bounding[1] : gr.pos[1], gr._bounding ? gr._bounding[2] : gr.size[0],
      gr._bounding ? gr._bounding[3] : gr.size[1]);
  const s = ds.scale, o = ds.offset;
  return JSON.stringify([(x0 + o[0]) * s, (y0 + o[1]) * s, (x1 + o[0]) * s, (y1 + o[1]) * s]);
})()"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except Exception:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


async def screenshot(url: str, workflows: list[tuple[str, str]], width: int, height: int, scale: float) -> None:
    import aiohttp
    from PIL import Image

    port = free_port()
    profile = tempfile.mkdtemp(prefix="convrot-chromium-")
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("render_workflow: no chromium on PATH (apt-get install chromium)")
    proc = subprocess.Popen([browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", f"--window-size={width},{height}",
                             "--hide-scrollbars", "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with aiohttp.ClientSession() as s:
            tabs = None
            for _ in range(100):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/json") as r:
                        tabs = await r.json()
                        break
                except Exception:
                    await asyncio.sleep(0.2)
            ws_url = next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"]
            async with s.ws_connect(ws_url, max_msg_size=0) as ws:
                counter = 0

                async def call(method, **params):
                    nonlocal counter
                    counter += 1
                    mid = counter
                    await ws.send_json({"id": mid, "method": method, "params": params})
                    while True:
                        m = await ws.receive_json()
                        if m.get("id") == mid:
                            if "error" in m:
                                raise RuntimeError(f"{method}: {m['error']}")
                            return m["result"]

                async def js(expr):
                    r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
                    if "exceptionDetails" in r:
                        raise RuntimeError(f"JS error: {r['exceptionDetails']}")
                    return r.get("result", {}).get("value")

                await call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=scale,
                           mobile=False)
                await call("Page.enable")
                await call("Page.navigate", url=url)
                for _ in range(240):
                    await asyncio.sleep(0.5)
                    if await js("!!(window.app && window.app.graph && window.app.canvas && window.app.extensionManager)"):
                        break
                await asyncio.sleep(3)
                await js("(async () => { await window.app.extensionManager.command.execute("
                         "'Workspace.ToggleFocusMode'); })()")
                for wf_path, out in workflows:
                    with open(wf_path) as f:
                        wf = json.load(f)
                    await js(f"(async () => {{ await window.app.loadGraphData({json.dumps(wf)}); }})()")
                    await asyncio.sleep(1.5)
                    await js("document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button')"
                             ".forEach(b => b.click())")
                    await js("(async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView');"
                             " window.app.canvas.setDirty(true, true); })()")
                    await asyncio.sleep(1.5)
                    x0, y0, x1, y1 = json.loads(await js(BOUNDS_JS))
                    shot = await call("Page.captureScreenshot", format="png")
                    img = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
                    pad = 16
                    box = [max(0, int((x0 - pad) * scale)), max(0, int((y0 - pad) * scale)),
                           min(img.width, int((x1 + pad) * scale)), min(img.height, int((y1 + pad) * scale))]
                    img = img.crop(box)
                    if out.endswith(".jpg"):  # template-browser thumbnail
                        img.thumbnail((768, 768))
                        img.save(out, quality=85, optimize=True)
                    else:
                        img.save(out, optimize=True)
                    print(f"render_workflow: {os.path.relpath(out)} ({box[2] - box[0]}x{box[3] - box[1]})")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH") or os.path.join(REPO, "..", "ComfyUI"))
    ap.add_argument("--workflow", default=os.path.join(REPO, "workflows", "flux1_dev_text_to_image.json"))
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "workflow.png"))
    ap.add_argument("--all", metavar="DIR", help="also render every workflow into DIR/<name>.png")
    ap.add_argument("--thumbnails", action="store_true",
                    help="also write workflows/<name>.jpg, the thumbnails ComfyUI's template browser shows")
    ap.add_argument("--width", type=int, default=2300)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--scale", type=float, default=1.0)
    a = ap.parse_args()
    comfy = os.path.abspath(a.comfyui)
    if not os.path.isfile(os.path.join(comfy, "main.py")):
        raise SystemExit(f"render_workflow: no ComfyUI at {comfy} (--comfyui or COMFYUI_PATH)")
    jobs = [(a.workflow, a.out)]
    if a.all:
        os.makedirs(a.all, exist_ok=True)
        for f in sorted(os.listdir(os.path.join(REPO, "workflows"))):
            if f.endswith(".json"):
                jobs.append((os.path.join(REPO, "workflows", f), os.path.join(a.all, f[:-5] + ".png")))

    if a.thumbnails:
        for f in sorted(os.listdir(os.path.join(REPO, "workflows"))):
            if f.endswith(".json"):
                path = os.path.join(REPO, "workflows", f)
                jobs.append((path, path[:-5] + ".jpg"))

    base = tempfile.mkdtemp(prefix="convrot-render-")
    server = None
    try:
        for d in ("custom_nodes", "input", "user/default"):
            os.makedirs(os.path.join(base, d), exist_ok=True)
        os.symlink(REPO, os.path.join(base, "custom_nodes", "ComfyUI-ConvRot"))
        for p in placeholders(w for w, _ in jobs):
            path = os.path.join(base, "models", p)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
        example = os.path.join(comfy, "input", "example.png")
        if os.path.isfile(example):
            shutil.copy(example, os.path.join(base, "input"))
        with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w") as f:
            json.dump(SETTINGS, f)
        port = free_port()
        log = open(os.path.join(base, "comfyui.log"), "w")
        server = subprocess.Popen([sys.executable, LAUNCHER, os.path.join(comfy, "main.py"), "--cpu",
                                   "--base-directory", base, "--listen", "127.0.0.1", "--port", str(port),
                                   "--disable-auto-launch"],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=comfy)
        wait_http(f"http://127.0.0.1:{port}/object_info/ConvRotW4A4Loader", 180)
        asyncio.run(screenshot(f"http://127.0.0.1:{port}", jobs, a.width, a.height, a.scale))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
