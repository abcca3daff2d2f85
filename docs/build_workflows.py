"""Writes the example workflows in workflows/ (ComfyUI's UI format, the JSON the canvas saves and loads).

    python docs/build_workflows.py          # rewrite workflows/*.json
    python docs/build_workflows.py --check  # exit 1 if a file in workflows/ differs from what this script writes

The graphs are written from this script rather than by hand so ids, link tables and slot numbers stay consistent;
tests/test_workflows.py checks every file against the live ComfyUI node definitions and runs each one headless.
Only plain Python: no ComfyUI needed to build them.
"""
from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
OUT_DIR = os.path.join(HERE, "..", "workflows")

LOADER, SAVER = "ConvRotW4A4Loader", "ConvRotSaveQuantized"
SAVE_PREFIX = "convrot/flux_w4a4"
# What ConvRot Save Quantized writes for that prefix on its first run (ComfyUI's counter convention).
SAVED_FILE = SAVE_PREFIX + "_00001_.safetensors"

# Socket inputs, outputs and widget count of each node type used here (the test checks them against ComfyUI).
# inputs/outputs: (name, type); "widgets" counts the entries of widgets_values the frontend writes.
SPECS = {
    LOADER: dict(inputs=[], outputs=[("MODEL", "MODEL")], title="ConvRot W4A4 Loader"),
    SAVER: dict(inputs=[("model", "MODEL")], outputs=[], title="ConvRot Save Quantized"),
    "UNETLoader": dict(inputs=[], outputs=[("MODEL", "MODEL")]),
    "DualCLIPLoader": dict(inputs=[], outputs=[("CLIP", "CLIP")]),
    "CLIPTextEncode": dict(inputs=[("clip", "CLIP")], outputs=[("CONDITIONING", "CONDITIONING")]),
    "FluxGuidance": dict(inputs=[("conditioning", "CONDITIONING")], outputs=[("CONDITIONING", "CONDITIONING")]),
    "ConditioningZeroOut": dict(inputs=[("conditioning", "CONDITIONING")],
                                outputs=[("CONDITIONING", "CONDITIONING")]),
    "EmptySD3LatentImage": dict(inputs=[], outputs=[("LATENT", "LATENT")]),
    "KSampler": dict(inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                             ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")]),
    "VAELoader": dict(inputs=[], outputs=[("VAE", "VAE")]),
    "VAEDecode": dict(inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=[("IMAGE", "IMAGE")]),
    "VAEEncode": dict(inputs=[("pixels", "IMAGE"), ("vae", "VAE")], outputs=[("LATENT", "LATENT")]),
    "SaveImage": dict(inputs=[("images", "IMAGE")], outputs=[("IMAGE", "IMAGE")]),
    "LoraLoaderModelOnly": dict(inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")]),
    "LoadImage": dict(inputs=[], outputs=[("IMAGE", "IMAGE"), ("MASK", "MASK")]),
    "FluxKontextImageScale": dict(inputs=[("image", "IMAGE")], outputs=[("IMAGE", "IMAGE")]),
    "ReferenceLatent": dict(inputs=[("conditioning", "CONDITIONING"), ("latent", "LATENT")],
                            outputs=[("CONDITIONING", "CONDITIONING")]),
    "MarkdownNote": dict(inputs=[], outputs=[]),
}
FRONTEND_ONLY = {"MarkdownNote", "Note"}  # virtual nodes of the frontend, never sent to the server

# Colours the frontend uses for its "green"/"blue"/"yellow" node colour options.
GREEN = ("#232", "#353")
BLUE = ("#223", "#335")
YELLOW = ("#432", "#653")


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, type_: str, pos, size, widgets=None, title=None, color=None) -> int:
        spec = SPECS[type_]
        nid = len(self.nodes) + 1
        node = {
            "id": nid,
            "type": type_,
            "pos": list(pos),
            "size": list(size),
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in spec["inputs"]],
            "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                        for i, (n, t) in enumerate(spec["outputs"])],
            "properties": ({} if type_ in FRONTEND_ONLY else {"Node name for S&R": type_}),
            "widgets_values": list(widgets or []),
        }
        if type_ not in (LOADER, SAVER) and type_ not in FRONTEND_ONLY:
            node["properties"]["cnr_id"] = "comfy-core"
        if title or spec.get("title"):
            node["title"] = title or spec["title"]
        if color:
            node["color"], node["bgcolor"] = color
        self.nodes.append(node)
        return nid

    def node(self, nid: int) -> dict:
        return self.nodes[nid - 1]

    def link(self, src: int, src_out: str, dst: int, dst_in: str) -> None:
        s, d = self.node(src), self.node(dst)
        so = next(i for i, o in enumerate(s["outputs"]) if o["name"] == src_out)
        di = next(i for i, o in enumerate(d["inputs"]) if o["name"] == dst_in)
        lid = len(self.links) + 1
        typ = s["outputs"][so]["type"]
        self.links.append([lid, src, so, dst, di, typ])
        s["outputs"][so]["links"].append(lid)
        d["inputs"][di]["link"] = lid

    def group(self, title: str, x: float, y: float, w: float, h: float, color: str = "#3f789e") -> None:
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [x, y, w, h], "color": color,
                            "font_size": 24, "flags": {}})

    def _order(self) -> None:
        """Execution order the frontend would compute (topological; notes first)."""
        deps = {n["id"]: {self.links[i["link"] - 1][1] for i in n["inputs"] if i["link"]} for n in self.nodes}
        done, order = set(), []
        while len(order) < len(self.nodes):
            ready = sorted(n for n in deps if n not in done and deps[n] <= done)
            for n in ready:
                done.add(n)
                order.append(n)
        for i, n in enumerate(order):
            self.node(n)["order"] = i

    def to_json(self) -> dict:
        self._order()
        for n in self.nodes:
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
        return {
            "id": None,
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [520, 80]}},
            "version": 0.4,
        }


# ----------------------------------------------------------------------------- notes

def note_text(diffusion_model: str, t5: str, extra: str = "", lora: bool = False, url: str = "",
              saved: bool = False) -> str:
    lora_line = "│   ├── loras/\n│   │   └── your_flux_lora.safetensors\n" if lora else ""
    dm = f"[{diffusion_model}]({url})" if url else diffusion_model
    what = ("written by the *flux1_dev_quantize_and_save* workflow" if saved else
            "bf16, fp16 or fp8 FLUX.1 file, or a file saved by *ConvRot Save Quantized*")
    tip = ("" if saved else "To skip quantizing at every start, run the *quantize once and save* workflow and load "
           "the saved file instead.\n")
    return (
        "## Model files\n\n"
        f"- **Diffusion model**: {dm} ({what})\n"
        "- **Text encoders**: clip_l.safetensors and "
        f"{t5} ([comfyanonymous/flux_text_encoders](https://huggingface.co/comfyanonymous/flux_text_encoders))\n"
        "- **VAE**: ae.safetensors (the FLUX.1 autoencoder)\n\n"
        "```\n"
        "ComfyUI/\n"
        "└── models/\n"
        "    ├── diffusion_models/\n"
        f"    │   └── {diffusion_model}\n"
        + lora_line.replace("│   ├", "    ├").replace("│   │", "    │")
        + "    ├── text_encoders/\n"
        "    │   ├── clip_l.safetensors\n"
        f"    │   └── {t5}\n"
        "    └── vae/\n"
        "        └── ae.safetensors\n"
        "```\n\n"
        "## ConvRot\n\n"
        "*ConvRot W4A4 Loader* replaces the stock *Load Diffusion Model* node: it quantizes the transformer to "
        "4-bit weights and activations while loading (no calibration). Preset `mixed` is the default; see the "
        "node's help page (the **?** in the node library) for the other presets and their memory.\n\n"
        + tip
        + (f"\n{extra}\n" if extra else "")
    )


HF_DEV = "https://huggingface.co/black-forest-labs/FLUX.1-dev"
HF_SCHNELL = "https://huggingface.co/black-forest-labs/FLUX.1-schnell"
HF_KONTEXT = "https://huggingface.co/black-forest-labs/FLUX.1-Kontext-dev"


# ----------------------------------------------------------------------------- workflows

def sample_decode_save(g: Graph, model, positive, negative, latent, vae, steps: int, prefix: str) -> None:
    """The right-hand column every graph shares: KSampler (euler/simple, cfg 1) -> VAEDecode -> SaveImage."""
    ks = g.add("KSampler", (860, 40), (320, 270), [42, "fixed", steps, 1.0, "euler", "simple", 1.0])
    g.link(model, "MODEL", ks, "model")
    g.link(positive, "CONDITIONING", ks, "positive")
    g.link(negative, "CONDITIONING", ks, "negative")
    g.link(latent, "LATENT", ks, "latent_image")
    dec = g.add("VAEDecode", (860, 350), (320, 50))
    g.link(ks, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    save = g.add("SaveImage", (1220, 40), (440, 520), [prefix])
    g.link(dec, "IMAGE", save, "images")


def text_to_image(model_file: str, t5: str, steps: int, guidance: float | None, prompt: str, note: str,
                  lora: tuple[str, float] | None = None, loader_widgets=None, prefix: str = "ConvRot/flux") -> Graph:
    """The shared txt2img graph: ConvRot loader [-> LoRA] -> KSampler, DualCLIP -> prompt [-> FluxGuidance]."""
    g = Graph()
    g.add("MarkdownNote", (-480, 40), (440, 620), [note], title="Read me: model files", color=YELLOW)
    loader = g.add(LOADER, (0, 40), (360, 220), loader_widgets or [model_file, "mixed", "256", "", "auto"], color=GREEN)
    model = loader
    y = 300
    if lora:
        lo = g.add("LoraLoaderModelOnly", (0, y), (360, 90), list(lora))
        g.link(loader, "MODEL", lo, "model")
        model, y = lo, y + 130
    clip = g.add("DualCLIPLoader", (0, y), (360, 130), ["clip_l.safetensors", t5, "flux", "default"])
    vae = g.add("VAELoader", (0, y + 170), (360, 60), ["ae.safetensors"])
    pos = g.add("CLIPTextEncode", (400, 40), (420, 200), [prompt], title="CLIP Text Encode (Prompt)", color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    positive = pos
    if guidance is not None:
        fg = g.add("FluxGuidance", (400, 280), (420, 60), [guidance])
        g.link(pos, "CONDITIONING", fg, "conditioning")
        positive = fg
    zero = g.add("ConditioningZeroOut", (400, 380), (420, 30))
    g.link(pos, "CONDITIONING", zero, "conditioning")
    latent = g.add("EmptySD3LatentImage", (400, 450), (420, 110), [1024, 1024, 1])
    sample_decode_save(g, model, positive, zero, latent, vae, steps, prefix)
    g.group("Models", -20, -30, 400, y + 280)
    g.group("Prompt and size", 380, -30, 460, 610)
    g.group("Sample and save", 840, -30, 840, 610)
    return g


PROMPT = ("A red fox sitting in a snowy birch forest at golden hour, detailed fur, soft backlight, shallow depth of "
          "field, photograph")


def flux1_dev():
    return text_to_image("flux1-dev.safetensors", "t5xxl_fp16.safetensors", 20, 3.5, PROMPT,
                         note_text("flux1-dev.safetensors", "t5xxl_fp16.safetensors", url=HF_DEV),
                         prefix="ConvRot/flux1-dev")


def flux1_schnell():
    extra = ("FLUX.1-schnell is distilled: 4 steps, cfg 1.0 and no FluxGuidance node. The fp8 T5 keeps the text "
             "encoder small too; t5xxl_fp16.safetensors works as well.")
    return text_to_image("flux1-schnell.safetensors", "t5xxl_fp8_e4m3fn.safetensors", 4, None, PROMPT,
                         note_text("flux1-schnell.safetensors", "t5xxl_fp8_e4m3fn.safetensors", extra,
                                   url=HF_SCHNELL),
                         prefix="ConvRot/flux1-schnell")


def flux1_dev_lora():
    extra = ("LoRAs apply on top of the quantized model through the stock *LoraLoaderModelOnly* node placed after "
             "the ConvRot loader. Put your FLUX.1 LoRA in models/loras/ and pick it in that node.")
    return text_to_image("flux1-dev.safetensors", "t5xxl_fp16.safetensors", 20, 3.5, PROMPT,
                         note_text("flux1-dev.safetensors", "t5xxl_fp16.safetensors", extra, lora=True, url=HF_DEV),
                         lora=("your_flux_lora.safetensors", 1.0), prefix="ConvRot/flux1-dev-lora")


def quantize_and_save():
    g = Graph()
    note = (
        "## Quantize once, load fast\n\n"
        "Put **flux1-dev.safetensors** (or any FLUX.1 bf16/fp16/fp8 transformer) in `models/diffusion_models/` "
        "and press *Queue*.\n\n"
        "*ConvRot W4A4 Loader* quantizes it with the chosen preset and group size; *ConvRot Save Quantized* writes "
        f"the result to\n\n`models/unet/{SAVED_FILE}`\n\n"
        "(ComfyUI's first `diffusion_models` folder on a default install; with extra_model_paths.yaml its first "
        "diffusion_models path; the counter goes up if the file exists). No image is made.\n\n"
        "Then open the workflow **flux1_dev_load_saved_w4a4** (or refresh the node list with **R**) and pick "
        "that file in the loader: it loads without re-quantizing. The stock *Load Diffusion Model* node can load "
        "it too.\n"
    )
    g.add("MarkdownNote", (-480, 40), (440, 420), [note], title="Read me", color=YELLOW)
    loader = g.add(LOADER, (0, 40), (360, 220), ["flux1-dev.safetensors", "mixed", "256", "", "auto"], color=GREEN)
    save = g.add(SAVER, (420, 40), (380, 90), [SAVE_PREFIX], color=GREEN)
    g.link(loader, "MODEL", save, "model")
    return g


def load_saved():
    note = ("This graph loads the file written by the **flux1_dev_quantize_and_save** workflow: "
            f"`models/unet/{SAVED_FILE}` (the first `diffusion_models` folder; the loaders list it with the files "
            "of `models/diffusion_models/`). A ConvRot file loads as is; the loader's preset, group size "
            "and overrides apply only when it quantizes a bf16/fp16/fp8 file.")
    text = note_text(SAVED_FILE, "t5xxl_fp16.safetensors", note, saved=True)
    return text_to_image(SAVED_FILE, "t5xxl_fp16.safetensors", 20, 3.5, PROMPT, text,
                         prefix="ConvRot/flux1-dev-saved")


def kontext():
    g = Graph()
    extra = ("**Editing**: load the picture to edit in *Load Image* (it is resized to a Kontext resolution near 1 "
             "megapixel) and describe the change in the prompt, e.g. *change the car colour to red, keep everything "
             "else unchanged*.")
    g.add("MarkdownNote", (-480, 40), (440, 700),
          [note_text("flux1-kontext-dev.safetensors", "t5xxl_fp16.safetensors", extra, url=HF_KONTEXT)],
          title="Read me: model files", color=YELLOW)
    loader = g.add(LOADER, (0, 40), (360, 220), ["flux1-kontext-dev.safetensors", "mixed", "256", "", "auto"], color=GREEN)
    clip = g.add("DualCLIPLoader", (0, 300), (360, 130),
                 ["clip_l.safetensors", "t5xxl_fp16.safetensors", "flux", "default"])
    vae = g.add("VAELoader", (0, 470), (360, 60), ["ae.safetensors"])
    img = g.add("LoadImage", (0, 640), (360, 360), ["example.png", "image"], color=GREEN)
    scale = g.add("FluxKontextImageScale", (400, 640), (280, 30))
    g.link(img, "IMAGE", scale, "image")
    enc = g.add("VAEEncode", (400, 720), (280, 50))
    g.link(scale, "IMAGE", enc, "pixels")
    g.link(vae, "VAE", enc, "vae")
    pos = g.add("CLIPTextEncode", (400, 40), (420, 200),
                ["Turn the scene into a winter evening with falling snow, keep the composition unchanged"],
                title="CLIP Text Encode (Prompt)", color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    ref = g.add("ReferenceLatent", (400, 280), (280, 50))
    g.link(pos, "CONDITIONING", ref, "conditioning")
    g.link(enc, "LATENT", ref, "latent")
    fg = g.add("FluxGuidance", (400, 380), (280, 60), [2.5])
    g.link(ref, "CONDITIONING", fg, "conditioning")
    zero = g.add("ConditioningZeroOut", (400, 480), (280, 30))
    g.link(pos, "CONDITIONING", zero, "conditioning")
    sample_decode_save(g, loader, fg, zero, enc, vae, 20, "ConvRot/flux1-kontext")
    g.group("Models", -20, -30, 400, 570)
    g.group("Image to edit", -20, 580, 720, 440)
    g.group("Prompt and reference", 380, -30, 460, 570)
    g.group("Sample and save", 840, -30, 840, 610)
    return g


WORKFLOWS = {
    "flux1_dev_text_to_image": (flux1_dev, "FLUX.1-dev text to image, 1024x1024, 20 steps, guidance 3.5"),
    "flux1_schnell_text_to_image": (flux1_schnell, "FLUX.1-schnell text to image, 1024x1024, 4 steps"),
    "flux1_dev_lora": (flux1_dev_lora, "FLUX.1-dev with a LoRA (stock LoraLoaderModelOnly after the ConvRot loader)"),
    "flux1_dev_quantize_and_save": (quantize_and_save, "quantize once and save a native ConvRot file"),
    "flux1_dev_load_saved_w4a4": (load_saved, "text to image from the saved ConvRot file (no re-quantization)"),
    "flux1_kontext_dev_image_edit": (kontext, "FLUX.1 Kontext [dev] image editing, guidance 2.5"),
}
MAIN = "flux1_dev_text_to_image"


def render_all() -> dict[str, str]:
    return {name + ".json": json.dumps(fn().to_json(), indent=2, ensure_ascii=False) + "\n"
            for name, (fn, _) in WORKFLOWS.items()}


def main(argv) -> int:
    files = render_all()
    os.makedirs(OUT_DIR, exist_ok=True)
    if "--check" in argv:
        bad = [f for f, text in files.items()
               if not os.path.exists(os.path.join(OUT_DIR, f))
               or open(os.path.join(OUT_DIR, f), encoding="utf-8").read() != text]
        for f in bad:
            print(f"workflows/{f} differs from docs/build_workflows.py; rerun it")
        return 1 if bad else 0
    for f, text in files.items():
        with open(os.path.join(OUT_DIR, f), "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        print("wrote workflows/" + f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
