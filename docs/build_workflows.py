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
    # the nodes of ComfyUI's own FLUX.2 / Chroma / Qwen-Image / Wan templates (v0.29)
    "CLIPLoader": dict(inputs=[], outputs=[("CLIP", "CLIP")]),
    "EmptyFlux2LatentImage": dict(inputs=[], outputs=[("LATENT", "LATENT")]),
    "EmptyHunyuanLatentVideo": dict(inputs=[], outputs=[("LATENT", "LATENT")]),
    "Flux2Scheduler": dict(inputs=[], outputs=[("SIGMAS", "SIGMAS")]),
    "BasicScheduler": dict(inputs=[("model", "MODEL")], outputs=[("SIGMAS", "SIGMAS")]),
    "KSamplerSelect": dict(inputs=[], outputs=[("SAMPLER", "SAMPLER")]),
    "RandomNoise": dict(inputs=[], outputs=[("NOISE", "NOISE")]),
    "BasicGuider": dict(inputs=[("model", "MODEL"), ("conditioning", "CONDITIONING")], outputs=[("GUIDER", "GUIDER")]),
    "CFGGuider": dict(inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
                      outputs=[("GUIDER", "GUIDER")]),
    "SamplerCustomAdvanced": dict(inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                          ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                                  outputs=[("output", "LATENT"), ("denoised_output", "LATENT")]),
    "ModelSamplingAuraFlow": dict(inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")]),
    "ModelSamplingSD3": dict(inputs=[("model", "MODEL")], outputs=[("MODEL", "MODEL")]),
    "KSamplerAdvanced": dict(inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING"),
                                     ("latent_image", "LATENT")], outputs=[("LATENT", "LATENT")]),
    "CreateVideo": dict(inputs=[("images", "IMAGE"), ("audio", "AUDIO")], outputs=[("VIDEO", "VIDEO")]),
    "SaveVideo": dict(inputs=[("video", "VIDEO")], outputs=[("video", "VIDEO")]),
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


# ----------------------------------------------------------------------------- newer families

# Transformer weights per preset, as `python docs/preset_memory.py --families` prints them (ComfyUI's own model
# classes with the released models' configurations; tests/test_workflows.py recomputes them and fails on a
# mismatch). Keys: the row labels of preset_memory.FAMILY_CONFIGS.
FAMILY_MEMORY = {
    "FLUX.2 [dev] (32B)": {"bf16": "64.4 GB", "mixed": "17.7 GB", "w4a4": "17.4 GB", "compact": "16.8 GB",
                           "w8a8": "32.5 GB"},
    "FLUX.2 [klein] 9B": {"bf16": "18.2 GB", "mixed": "5.2 GB", "w4a4": "5.1 GB", "compact": "4.8 GB",
                          "w8a8": "9.2 GB"},
    "FLUX.2 [klein] 4B": {"bf16": "7.8 GB", "mixed": "2.3 GB", "w4a4": "2.2 GB", "compact": "2.1 GB",
                          "w8a8": "3.9 GB"},
    "Chroma (8.9B)": {"bf16": "17.8 GB", "mixed": "5.0 GB", "w4a4": "4.9 GB", "compact": "4.6 GB", "w8a8": "8.9 GB"},
    "Qwen-Image (20B)": {"bf16": "40.9 GB", "mixed": "14.4 GB", "w4a4": "20.5 GB", "compact": "13.7 GB",
                         "w8a8": "20.5 GB"},
    "Wan 2.1 / 2.2 14B (per expert)": {"bf16": "28.6 GB", "mixed": "8.7 GB", "w4a4": "7.5 GB", "compact": "7.5 GB",
                                       "w8a8": "14.5 GB"},
}
PRESETS = ("mixed", "w4a4", "compact", "w8a8")


def memory_table(*labels: str) -> str:
    rows = ["| model | bf16 | " + " | ".join(f"`{p}`" for p in PRESETS) + " |", "|---|---|" + "---|" * len(PRESETS)]
    for label in labels:
        m = FAMILY_MEMORY[label]
        rows.append(f"| {label} | {m['bf16']} | " + " | ".join(m[p] for p in PRESETS) + " |")
    return "\n".join(rows) + "\n"


def family_note(title: str, files: list[tuple[str, str, str, str]], preset: str, labels: tuple[str, ...],
                extra: str = "") -> str:
    """The read-me of a family's graph: the files ([(folder, name, link, what)]), the preset and its memory."""
    lines = [f"## {title}: model files\n"]
    for folder, name, url, what in files:
        shown = f"[{name}]({url})" if url else name
        lines.append(f"- **{folder}**: {shown}" + (f" ({what})" if what else ""))
    tree = ["", "```", "ComfyUI/", "└── models/"]
    folders = []
    for folder, name, *_ in files:
        if folder not in folders:
            folders.append(folder)
    for i, folder in enumerate(folders):
        last = i == len(folders) - 1
        tree.append(("    └── " if last else "    ├── ") + folder + "/")
        names = [n for f, n, *_ in files if f == folder]
        for j, name in enumerate(names):
            tree.append(("        " if last else "    │   ") + ("└── " if j == len(names) - 1 else "├── ") + name)
    tree.append("```\n")
    return (
        "\n".join(lines) + "\n" + "\n".join(tree) + "\n"
        "## ConvRot\n\n"
        "*ConvRot W4A4 Loader* replaces the stock *Load Diffusion Model* node: it quantizes the transformer to "
        "4-bit weights and activations while loading (no calibration; bf16, fp16 and fp8 files, or a file saved by "
        "*ConvRot Save Quantized*). The rest of the graph is ComfyUI's own.\n\n"
        + preset + "\n\n"
        "Transformer weights per preset (from the layer shapes, `python docs/preset_memory.py --families`; text "
        "encoder, VAE and activations not included):\n\n"
        + memory_table(*labels)
        + (f"\n{extra}\n" if extra else "")
    )


HF_FLUX2_DEV = "https://huggingface.co/Comfy-Org/flux2-dev/resolve/main/split_files"
HF_FLUX2_KLEIN = "https://huggingface.co/Comfy-Org/flux2-klein/resolve/main/split_files"
HF_QWEN = "https://huggingface.co/Comfy-Org/Qwen-Image_ComfyUI/resolve/main/split_files"
HF_WAN22 = "https://huggingface.co/Comfy-Org/Wan_2.2_ComfyUI_Repackaged/resolve/main/split_files"
HF_WAN21 = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"
HF_FLUX_TE = "https://huggingface.co/comfyanonymous/flux_text_encoders/resolve/main"
MIXED_WHY = ("Preset `mixed` (the default) keeps the timestep modulation and the attention output projections at "
             "8 bits and the last block's MLP outputs in bf16, the rest at 4 bits.")


def loader_column(g: Graph, model_file: str, clip: tuple[str, str], vae: str, y0: int = 40):
    loader = g.add(LOADER, (0, y0), (360, 220), [model_file, "mixed", "256", "", "auto"], color=GREEN)
    te = g.add("CLIPLoader", (0, y0 + 260), (360, 110), [clip[0], clip[1], "default"])
    v = g.add("VAELoader", (0, y0 + 410), (360, 60), [vae])
    return loader, te, v


def custom_sampler(g: Graph, guider: int, sigmas: int, latent: int, vae: int, prefix: str, x: int = 860) -> None:
    """RandomNoise + KSamplerSelect + guider + sigmas -> SamplerCustomAdvanced -> VAEDecode -> SaveImage."""
    noise = g.add("RandomNoise", (x, 40), (320, 82), [42, "fixed"])
    sampler = g.add("KSamplerSelect", (x, 160), (320, 58), ["euler"])
    sca = g.add("SamplerCustomAdvanced", (x, 400), (320, 110))
    g.link(noise, "NOISE", sca, "noise")
    g.link(guider, "GUIDER", sca, "guider")
    g.link(sampler, "SAMPLER", sca, "sampler")
    g.link(sigmas, "SIGMAS", sca, "sigmas")
    g.link(latent, "LATENT", sca, "latent_image")
    dec = g.add("VAEDecode", (x, 550), (320, 50))
    g.link(sca, "output", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    save = g.add("SaveImage", (x + 360, 40), (440, 520), [prefix])
    g.link(dec, "IMAGE", save, "images")


def flux2_dev():
    g = Graph()
    note = family_note(
        "FLUX.2 [dev]",
        [("diffusion_models", "flux2_dev_fp8mixed.safetensors", f"{HF_FLUX2_DEV}/diffusion_models/"
          "flux2_dev_fp8mixed.safetensors", "Comfy-Org's repackaged file; a bf16 FLUX.2 [dev] file works too"),
         ("text_encoders", "mistral_3_small_flux2_bf16.safetensors",
          f"{HF_FLUX2_DEV}/text_encoders/mistral_3_small_flux2_bf16.safetensors", "CLIPLoader type `flux2`"),
         ("vae", "flux2-vae.safetensors", f"{HF_FLUX2_DEV}/vae/flux2-vae.safetensors", "")],
        MIXED_WHY + " On FLUX.2 the three modulation layers are shared by all blocks, so `w4a4` and `compact` "
        "save only a little more; `w8a8` halves bf16 and is the most faithful.",
        ("FLUX.2 [dev] (32B)",),
        "Sampling as in ComfyUI's FLUX.2 [dev] template: FluxGuidance 4.0, BasicGuider, Flux2Scheduler (20 steps, "
        "shift from the image size), euler.")
    g.add("MarkdownNote", (-560, 40), (520, 760), [note], title="Read me: model files", color=YELLOW)
    loader, clip, vae = loader_column(g, "flux2_dev_fp8mixed.safetensors",
                                      ("mistral_3_small_flux2_bf16.safetensors", "flux2"), "flux2-vae.safetensors")
    pos = g.add("CLIPTextEncode", (400, 40), (420, 200), [PROMPT], title="CLIP Text Encode (Prompt)", color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    fg = g.add("FluxGuidance", (400, 280), (420, 60), [4.0])
    g.link(pos, "CONDITIONING", fg, "conditioning")
    guider = g.add("BasicGuider", (400, 380), (420, 50))
    g.link(loader, "MODEL", guider, "model")
    g.link(fg, "CONDITIONING", guider, "conditioning")
    latent = g.add("EmptyFlux2LatentImage", (400, 470), (420, 110), [1024, 1024, 1])
    sigmas = g.add("Flux2Scheduler", (860, 260), (320, 110), [20, 1024, 1024])
    custom_sampler(g, guider, sigmas, latent, vae, "ConvRot/flux2-dev")
    g.group("Models", -20, -30, 400, 580)
    g.group("Prompt and size", 380, -30, 460, 640)
    g.group("Sample and save", 840, -30, 840, 640)
    return g


def flux2_klein():
    g = Graph()
    note = family_note(
        "FLUX.2 [klein] 4B",
        [("diffusion_models", "flux-2-klein-4b.safetensors", f"{HF_FLUX2_KLEIN}/diffusion_models/"
          "flux-2-klein-4b.safetensors", "the distilled model: 4 steps, cfg 1"),
         ("text_encoders", "qwen_3_4b.safetensors", f"{HF_FLUX2_KLEIN}/text_encoders/qwen_3_4b.safetensors",
          "CLIPLoader type `flux2`"),
         ("vae", "flux2-vae.safetensors", f"{HF_FLUX2_DEV}/vae/flux2-vae.safetensors", "")],
        MIXED_WHY + " For [klein] 9B pick its file here and its Qwen3 8B text encoder in the CLIPLoader (type "
        "`flux2` as well). The base (undistilled) [klein] models take about 20 steps and cfg 5.",
        ("FLUX.2 [klein] 4B", "FLUX.2 [klein] 9B"),
        "Sampling as in ComfyUI's FLUX.2 [klein] 4B distilled template: CFGGuider cfg 1.0 with a zeroed negative, "
        "Flux2Scheduler 4 steps, euler.")
    g.add("MarkdownNote", (-560, 40), (520, 760), [note], title="Read me: model files", color=YELLOW)
    loader, clip, vae = loader_column(g, "flux-2-klein-4b.safetensors", ("qwen_3_4b.safetensors", "flux2"),
                                      "flux2-vae.safetensors")
    pos = g.add("CLIPTextEncode", (400, 40), (420, 200), [PROMPT], title="CLIP Text Encode (Prompt)", color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    zero = g.add("ConditioningZeroOut", (400, 280), (420, 30))
    g.link(pos, "CONDITIONING", zero, "conditioning")
    guider = g.add("CFGGuider", (400, 350), (420, 100), [1.0])
    g.link(loader, "MODEL", guider, "model")
    g.link(pos, "CONDITIONING", guider, "positive")
    g.link(zero, "CONDITIONING", guider, "negative")
    latent = g.add("EmptyFlux2LatentImage", (400, 490), (420, 110), [1024, 1024, 1])
    sigmas = g.add("Flux2Scheduler", (860, 260), (320, 110), [4, 1024, 1024])
    custom_sampler(g, guider, sigmas, latent, vae, "ConvRot/flux2-klein")
    g.group("Models", -20, -30, 400, 580)
    g.group("Prompt and size", 380, -30, 460, 660)
    g.group("Sample and save", 840, -30, 840, 660)
    return g


NEGATIVE = "low quality, blurry, deformed, oversaturated, watermark, text"


def chroma():
    g = Graph()
    note = family_note(
        "Chroma",
        [("diffusion_models", "Chroma1-HD.safetensors", "https://huggingface.co/lodestones/Chroma1-HD/resolve/main/"
          "Chroma1-HD.safetensors", "bf16; Comfy-Org's Chroma1-HD-fp8mixed works too"),
         ("text_encoders", "t5xxl_fp8_e4m3fn_scaled.safetensors",
          f"{HF_FLUX_TE}/t5xxl_fp8_e4m3fn_scaled.safetensors", "CLIPLoader type `chroma`; t5xxl_fp16 works too"),
         ("vae", "ae.safetensors", "", "the FLUX.1 autoencoder")],
        MIXED_WHY.replace("the timestep modulation", "Chroma's modulation approximator")
        + " `compact` saves 0.4 GB more, `w8a8` halves bf16 and is the most faithful.",
        ("Chroma (8.9B)",),
        "Sampling as in ComfyUI's Chroma template: ModelSamplingAuraFlow shift 1.0, CFGGuider cfg 3.5 with a "
        "negative prompt, BasicScheduler beta 26 steps, euler.")
    g.add("MarkdownNote", (-560, 40), (520, 760), [note], title="Read me: model files", color=YELLOW)
    loader, clip, vae = loader_column(g, "Chroma1-HD.safetensors", ("t5xxl_fp8_e4m3fn_scaled.safetensors", "chroma"),
                                      "ae.safetensors")
    ms = g.add("ModelSamplingAuraFlow", (0, 560), (360, 60), [1.0])
    g.link(loader, "MODEL", ms, "model")
    pos = g.add("CLIPTextEncode", (400, 40), (420, 180), [PROMPT], title="CLIP Text Encode (Prompt)", color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    neg = g.add("CLIPTextEncode", (400, 260), (420, 140), [NEGATIVE], title="CLIP Text Encode (Negative)")
    g.link(clip, "CLIP", neg, "clip")
    guider = g.add("CFGGuider", (400, 440), (420, 100), [3.5])
    g.link(ms, "MODEL", guider, "model")
    g.link(pos, "CONDITIONING", guider, "positive")
    g.link(neg, "CONDITIONING", guider, "negative")
    latent = g.add("EmptySD3LatentImage", (400, 580), (420, 110), [1024, 1024, 1])
    sigmas = g.add("BasicScheduler", (860, 260), (320, 110), ["beta", 26, 1.0])
    g.link(ms, "MODEL", sigmas, "model")
    custom_sampler(g, guider, sigmas, latent, vae, "ConvRot/chroma")
    g.group("Models", -20, -30, 400, 680)
    g.group("Prompt and size", 380, -30, 460, 750)
    g.group("Sample and save", 840, -30, 840, 750)
    return g


def qwen_image():
    g = Graph()
    note = family_note(
        "Qwen-Image",
        [("diffusion_models", "qwen_image_fp8_e4m3fn.safetensors",
          f"{HF_QWEN}/diffusion_models/qwen_image_fp8_e4m3fn.safetensors",
          "Comfy-Org's repackaged file; a bf16 Qwen-Image file works too"),
         ("text_encoders", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
          f"{HF_QWEN}/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors", "CLIPLoader type `qwen_image`"),
         ("vae", "qwen_image_vae.safetensors", f"{HF_QWEN}/vae/qwen_image_vae.safetensors", "")],
        "Preset `mixed` (the default) is the one to use here: Qwen-Image's per-block modulation layers are large, "
        "so `w4a4` (which keeps them in bf16) is bigger than `mixed`, which runs them at 8 bits. `compact` saves "
        "0.7 GB more; attention outputs stay 8-bit under `mixed`, the last block's MLP outputs bf16.",
        ("Qwen-Image (20B)",),
        "Sampling as in ComfyUI's Qwen-Image template (without the Lightning LoRA): ModelSamplingAuraFlow shift "
        "3.1, 20 steps, cfg 4.0, euler/simple, 1328x1328.")
    g.add("MarkdownNote", (-560, 40), (520, 760), [note], title="Read me: model files", color=YELLOW)
    loader, clip, vae = loader_column(g, "qwen_image_fp8_e4m3fn.safetensors",
                                      ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"),
                                      "qwen_image_vae.safetensors")
    ms = g.add("ModelSamplingAuraFlow", (0, 560), (360, 60), [3.1])
    g.link(loader, "MODEL", ms, "model")
    pos = g.add("CLIPTextEncode", (400, 40), (420, 200), [PROMPT], title="CLIP Text Encode (Prompt)", color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    neg = g.add("CLIPTextEncode", (400, 280), (420, 120), [""], title="CLIP Text Encode (Negative)")
    g.link(clip, "CLIP", neg, "clip")
    latent = g.add("EmptySD3LatentImage", (400, 450), (420, 110), [1328, 1328, 1])
    ks = g.add("KSampler", (860, 40), (320, 270), [42, "fixed", 20, 4.0, "euler", "simple", 1.0])
    g.link(ms, "MODEL", ks, "model")
    g.link(pos, "CONDITIONING", ks, "positive")
    g.link(neg, "CONDITIONING", ks, "negative")
    g.link(latent, "LATENT", ks, "latent_image")
    dec = g.add("VAEDecode", (860, 350), (320, 50))
    g.link(ks, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    save = g.add("SaveImage", (1220, 40), (440, 520), ["ConvRot/qwen-image"])
    g.link(dec, "IMAGE", save, "images")
    g.group("Models", -20, -30, 400, 680)
    g.group("Prompt and size", 380, -30, 460, 620)
    g.group("Sample and save", 840, -30, 840, 620)
    return g


VIDEO_PROMPT = ("A red fox trotting through a snowy birch forest at golden hour, snow falling, the camera tracking "
                "beside it, cinematic")
WAN_NEGATIVE = "static, blurry, low quality, jpeg artifacts, deformed, subtitles, watermark"


def wan22_t2v():
    g = Graph()
    high, low = "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"
    note = family_note(
        "Wan 2.2 14B text to video",
        [("diffusion_models", high, f"{HF_WAN22}/diffusion_models/{high}", "the high-noise expert"),
         ("diffusion_models", low, f"{HF_WAN22}/diffusion_models/{low}", "the low-noise expert"),
         ("text_encoders", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
          f"{HF_WAN21}/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors", "CLIPLoader type `wan`"),
         ("vae", "wan_2.1_vae.safetensors", f"{HF_WAN22}/vae/wan_2.1_vae.safetensors", "")],
        "Wan 2.2 14B is two transformers of the same shape: the high-noise expert samples the first 10 steps, the "
        "low-noise expert the last 10; each has its own ConvRot loader (the memory below is per expert). Preset "
        "`mixed` (the default) keeps the self- and cross-attention output projections at 8 bits and the last "
        "block's MLP output in bf16, the other block linears at 4 bits; `w4a4` and `compact` put those at 4 bits "
        "too (1.2 GB less per expert); `w8a8` is the most faithful. Wan 2.1 14B (one transformer, same shape) loads the same "
        "way.",
        ("Wan 2.1 / 2.2 14B (per expert)",),
        "Sampling as in ComfyUI's Wan 2.2 14B text-to-video template (without the 4-step LoRAs): ModelSamplingSD3 "
        "shift 5.0, two KSamplerAdvanced (20 steps, cfg 3.5, euler/simple, split at step 10), 640x640, 81 frames "
        "(5 s at 16 fps), saved as a video by CreateVideo + SaveVideo.")
    g.add("MarkdownNote", (-560, 40), (520, 860), [note], title="Read me: model files", color=YELLOW)
    lhigh = g.add(LOADER, (0, 40), (360, 220), [high, "mixed", "256", "", "auto"], title="ConvRot W4A4 Loader (high noise)",
                  color=GREEN)
    llow = g.add(LOADER, (0, 300), (360, 220), [low, "mixed", "256", "", "auto"], title="ConvRot W4A4 Loader (low noise)",
                 color=GREEN)
    clip = g.add("CLIPLoader", (0, 560), (360, 110), ["umt5_xxl_fp8_e4m3fn_scaled.safetensors", "wan", "default"])
    vae = g.add("VAELoader", (0, 710), (360, 60), ["wan_2.1_vae.safetensors"])
    mhigh = g.add("ModelSamplingSD3", (400, 40), (320, 60), [5.0])
    g.link(lhigh, "MODEL", mhigh, "model")
    mlow = g.add("ModelSamplingSD3", (400, 140), (320, 60), [5.0])
    g.link(llow, "MODEL", mlow, "model")
    pos = g.add("CLIPTextEncode", (400, 240), (420, 180), [VIDEO_PROMPT], title="CLIP Text Encode (Prompt)",
                color=GREEN)
    g.link(clip, "CLIP", pos, "clip")
    neg = g.add("CLIPTextEncode", (400, 460), (420, 140), [WAN_NEGATIVE], title="CLIP Text Encode (Negative)")
    g.link(clip, "CLIP", neg, "clip")
    latent = g.add("EmptyHunyuanLatentVideo", (400, 640), (420, 130), [640, 640, 81, 1])
    k1 = g.add("KSamplerAdvanced", (860, 40), (320, 334),
               ["enable", 42, "fixed", 20, 3.5, "euler", "simple", 0, 10, "enable"], title="KSampler (high noise)")
    g.link(mhigh, "MODEL", k1, "model")
    g.link(pos, "CONDITIONING", k1, "positive")
    g.link(neg, "CONDITIONING", k1, "negative")
    g.link(latent, "LATENT", k1, "latent_image")
    k2 = g.add("KSamplerAdvanced", (860, 420), (320, 334),
               ["disable", 0, "fixed", 20, 3.5, "euler", "simple", 10, 10000, "disable"], title="KSampler (low noise)")
    g.link(mlow, "MODEL", k2, "model")
    g.link(pos, "CONDITIONING", k2, "positive")
    g.link(neg, "CONDITIONING", k2, "negative")
    g.link(k1, "LATENT", k2, "latent_image")
    dec = g.add("VAEDecode", (1220, 40), (300, 50))
    g.link(k2, "LATENT", dec, "samples")
    g.link(vae, "VAE", dec, "vae")
    video = g.add("CreateVideo", (1220, 130), (300, 100), [16, 8])
    g.link(dec, "IMAGE", video, "images")
    save = g.add("SaveVideo", (1560, 40), (480, 560), ["ConvRot/wan2.2-t2v", "auto", "auto"])
    g.link(video, "VIDEO", save, "video")
    g.group("Models", -20, -30, 400, 820)
    g.group("Prompt and size", 380, -30, 460, 820)
    g.group("Sample and save", 840, -30, 1220, 820)
    return g


WORKFLOWS = {
    "flux1_dev_text_to_image": (flux1_dev, "FLUX.1-dev text to image, 1024x1024, 20 steps, guidance 3.5"),
    "flux1_schnell_text_to_image": (flux1_schnell, "FLUX.1-schnell text to image, 1024x1024, 4 steps"),
    "flux1_dev_lora": (flux1_dev_lora, "FLUX.1-dev with a LoRA (stock LoraLoaderModelOnly after the ConvRot loader)"),
    "flux1_dev_quantize_and_save": (quantize_and_save, "quantize once and save a native ConvRot file"),
    "flux1_dev_load_saved_w4a4": (load_saved, "text to image from the saved ConvRot file (no re-quantization)"),
    "flux1_kontext_dev_image_edit": (kontext, "FLUX.1 Kontext [dev] image editing, guidance 2.5"),
    "flux2_dev_text_to_image": (flux2_dev, "FLUX.2 [dev] text to image, 1024x1024, 20 steps, guidance 4.0"),
    "flux2_klein_text_to_image": (flux2_klein, "FLUX.2 [klein] 4B text to image, 1024x1024, 4 steps, cfg 1"),
    "chroma_text_to_image": (chroma, "Chroma1-HD text to image, 1024x1024, 26 steps, cfg 3.5"),
    "qwen_image_text_to_image": (qwen_image, "Qwen-Image text to image, 1328x1328, 20 steps, cfg 4.0"),
    "wan22_14b_text_to_video": (wan22_t2v, "Wan 2.2 14B text to video (two experts), 640x640, 81 frames"),
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
