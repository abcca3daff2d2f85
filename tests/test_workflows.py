"""The shipped example workflows (workflows/*.json) against the live ComfyUI node definitions, and headless runs.

Three layers, each skipped with its reason when what it needs is missing:
  1. plain JSON: every workflow is well formed (ids, link table, slots) and is exactly what docs/build_workflows.py
     writes; the node help pages quote the preset memory that docs/preset_memory.py derives from the engine.
  2. with ComfyUI (env COMFYUI_PATH, or ../ComfyUI beside the repo): every node type exists (stock, or ours loaded
     from this repo as a custom node pack), every widget value is valid for its input (combo options, int/float
     ranges; file combos accept any file name of the right kind), every link's type matches both ends.
  3. with ComfyUI: each workflow runs headless on CPU, converted to the API prompt format the way the frontend does,
     with tiny seeded stand-ins for the real files: a tiny random FLUX (convrot.flux.random_flux) under the
     workflow's diffusion-model file name, a tiny LoRA, a stand-in for the text encoders (seeded conditioning of the
     tiny model's widths) and a stand-in VAE (pooling/upsampling). Sizes and steps are shrunk to keep it fast.
     The FLUX.2 / Chroma / Qwen-Image / Wan graphs run on tiny instances of ComfyUI's own model classes
     (tests/tiny_families.py, shared with tests/test_families.py) built with the real text encoders' widths, the
     stock CLIPTextEncode on a stand-in CLIP that gives the width ComfyUI's text encoder for that CLIPLoader type and
     file would give (and refuses a pairing no family here is conditioned by), and a stand-in VAE of the family's
     latent channels and downscaling. test_wrong_choices_fail proves these layers catch a wrong node name, CLIP
     type or latent node.
Also with ComfyUI: the notes of those graphs quote the memory docs/preset_memory.py derives, and their loaders,
latent node and sampler nodes are those of ComfyUI's own template for the family (the installed
comfyui_workflow_templates package that ComfyUI's requirements pin).
"""
from __future__ import annotations

import asyncio
import copy
import glob
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import re
import sys
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOW_DIR = os.path.join(REPO, "workflows")
WORKFLOW_FILES = sorted(glob.glob(os.path.join(WORKFLOW_DIR, "*.json")))
WF_IDS = [os.path.splitext(os.path.basename(p))[0] for p in WORKFLOW_FILES]

sys.path.insert(0, os.path.join(REPO, "docs"))
sys.path.insert(0, REPO)
import build_workflows  # noqa: E402  (docs/build_workflows.py)

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
OUR_NODES = ("ConvRotW4A4Loader", "ConvRotSaveQuantized")
MODEL_EXTS = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin", ".gguf")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# The widget layout of our nodes (their fixed interface), for converting graphs while the pack is not importable.
OUR_WIDGETS = {"ConvRotW4A4Loader": ["unet_name", "preset", "group_size", "overrides"],
               "ConvRotSaveQuantized": ["filename_prefix"]}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def load(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ============================================================================ 1. plain JSON


def test_workflows_exist():
    names = set(WF_IDS)
    assert set(build_workflows.WORKFLOWS) <= names, f"missing: {set(build_workflows.WORKFLOWS) - names}"


def test_workflows_match_generator():
    want = build_workflows.render_all()
    for fname, text in want.items():
        with open(os.path.join(WORKFLOW_DIR, fname), encoding="utf-8") as f:  # any line ends
            assert f.read() == text, f"workflows/{fname} was edited by hand or is stale: run docs/build_workflows.py"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=WF_IDS)
def test_workflow_structure(path):
    wf = load(path)
    assert wf["version"] == 0.4
    for key in ("last_node_id", "last_link_id", "nodes", "links"):
        assert key in wf, key
    nodes = {n["id"]: n for n in wf["nodes"]}
    assert len(nodes) == len(wf["nodes"]), "duplicate node ids"
    assert wf["last_node_id"] >= max(nodes)
    assert not wf["links"] or wf["last_link_id"] >= max(lk[0] for lk in wf["links"])
    links = {}
    for lk in wf["links"]:
        assert len(lk) == 6, lk
        lid, src, so, dst, di, typ = lk
        assert lid not in links, f"duplicate link id {lid}"
        links[lid] = lk
        assert src in nodes and dst in nodes, f"link {lid} points at a missing node"
        out, inp = nodes[src]["outputs"][so], nodes[dst]["inputs"][di]
        assert lid in (out.get("links") or []), f"link {lid} missing from node {src} output {so}"
        assert inp["link"] == lid, f"node {dst} input {di} does not hold link {lid}"
        assert out["type"] == typ == inp["type"], f"link {lid}: {out['type']} -> {typ} -> {inp['type']}"
    for n in wf["nodes"]:
        for k in ("id", "type", "pos", "size", "inputs", "outputs", "widgets_values", "mode"):
            assert k in n, f"node {n.get('id')} lacks {k}"
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in links, f"node {n['id']} input {i['name']}: dangling link"
        for o in n["outputs"]:
            for lid in o.get("links") or []:
                assert links[lid][1] == n["id"], f"node {n['id']} output {o['name']}: link {lid} is not its own"
    notes = [n for n in wf["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes, "every workflow carries a note saying which model files go where"
    assert "models/" in notes[0]["widgets_values"][0] or "diffusion_models" in notes[0]["widgets_values"][0]
    types_ = {n["type"] for n in wf["nodes"]}
    assert "ConvRotW4A4Loader" in types_, "every example starts from the ConvRot loader"
    assert "UNETLoader" not in types_, "the ConvRot loader replaces the stock Load Diffusion Model node"


def test_saved_file_name_agrees():
    """The load-saved workflow picks the name the save workflow writes on its first run."""
    save = load(os.path.join(WORKFLOW_DIR, "flux1_dev_quantize_and_save.json"))
    loadw = load(os.path.join(WORKFLOW_DIR, "flux1_dev_load_saved_w4a4.json"))
    prefix = next(n for n in save["nodes"] if n["type"] == "ConvRotSaveQuantized")["widgets_values"][0]
    picked = next(n for n in loadw["nodes"] if n["type"] == "ConvRotW4A4Loader")["widgets_values"][0]
    assert picked == f"{prefix}_00001_.safetensors"


def test_help_pages_quote_derived_memory():
    import preset_memory  # docs/preset_memory.py

    sizes = preset_memory.preset_bytes()
    assert round(sizes["bf16"] / 1e9, 1) == 23.8  # FLUX.1-dev's 11.9B parameters in bf16
    page = open(os.path.join(REPO, "web", "docs", "ConvRotW4A4Loader.md"), encoding="utf-8").read()
    readme = open(os.path.join(REPO, "docs", "README_workflows.md"), encoding="utf-8").read()
    for p in preset_memory.PRESET_ORDER:
        needle = preset_memory.gb(sizes[p])
        assert re.search(rf"`{p}`[^\n]*{re.escape(needle)}", page), f"help page: {p} should say {needle}"
        assert needle in readme or p != "mixed", f"README snippet should quote {needle} for {p}"


def test_help_pages_exist():
    """The frontend fetches /extensions/<pack>/docs/<NodeName>.md, i.e. WEB_DIRECTORY/docs/<NodeName>.md."""
    web = "web"
    init = os.path.join(REPO, "__init__.py")
    if os.path.isfile(init):
        m = re.search(r"""^WEB_DIRECTORY\s*=\s*["']([^"']+)["']""", open(init, encoding="utf-8").read(), re.M)
        assert m, "__init__.py sets no WEB_DIRECTORY: ComfyUI would not serve web/docs"
        web = os.path.normpath(m.group(1))
    # every node the pack defines (node_id in nodes/*.py), so a new node without a page fails here
    ids = {m for f in glob.glob(os.path.join(REPO, "nodes", "*.py"))
           for m in re.findall(r'node_id="(\w+)"', open(f, encoding="utf-8").read())}
    assert set(OUR_NODES) | {"ConvRotCompileBlocks", "ConvRotCUDAGraph", "ConvRotQuantizedAttention"} <= ids, ids
    for node in sorted(ids):
        path = os.path.join(REPO, web, "docs", node + ".md")
        assert os.path.isfile(path), path
        text = open(path, encoding="utf-8").read()
        assert text.startswith("# "), f"{path}: start with a title"


# ============================================================================ ComfyUI in-process


class Comfy:
    """Handles on the in-process ComfyUI: node classes, and whether our pack loaded (or why not)."""

    def __init__(self, path, pack=None):
        self.path = path
        self.pack = pack
        self.nodes = importlib.import_module("nodes")
        self.folder_paths = importlib.import_module("folder_paths")
        self.pack_error = None
        missing = [n for n in OUR_NODES if n not in self.nodes.NODE_CLASS_MAPPINGS]
        if missing:
            self.pack_error = f"ConvRot nodes not importable from {REPO} (missing {', '.join(missing)})"

    def cls(self, type_):
        return self.nodes.NODE_CLASS_MAPPINGS.get(type_)


_COMFY = None


def get_comfy(tmp_path_factory):
    """The in-process ComfyUI of tests/comfy_env.py (stubs, CPU, the pack loaded) plus the stock extra nodes."""
    global _COMFY
    if _COMFY is not None:
        return _COMFY
    import comfy_env  # tests/comfy_env.py: the in-process ComfyUI shared by this test suite

    try:
        env = comfy_env.setup_comfy(tmp_path_factory.mktemp("comfy_shared") / "models")
    except AssertionError:
        env = None  # the pack did not load: recorded as pack_error, and the ConvRot checks fail with it
    nodes = importlib.import_module("nodes")
    if "FluxGuidance" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    _COMFY = Comfy(env.path if env is not None else comfy_env.comfyui_path(), getattr(env, "pack", None))
    return _COMFY


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    return get_comfy(tmp_path_factory)


# ---------------------------------------------------------------------------- node definitions


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _norm_type(t):
    return t if isinstance(t, str) else (getattr(t, "value", None) or str(t))


def input_defs(cls):
    """[(name, type, options, opts, required)] in the order the frontend builds the node."""
    spec = cls.INPUT_TYPES()
    out = []
    for section, required in (("required", True), ("optional", False)):
        for name, d in (spec.get(section) or {}).items():
            t = d[0]
            opts = dict(d[1]) if len(d) > 1 and isinstance(d[1], dict) else {}
            if isinstance(t, (list, tuple)):
                out.append((name, "COMBO", list(t), opts, required))
            else:
                t = _norm_type(t)
                out.append((name, t, list(opts.get("options", [])) if t == "COMBO" else None, opts, required))
    return out


def is_widget(t, opts):
    return t in WIDGET_TYPES and not opts.get("forceInput")


def widget_slots(cls):
    """The widgets_values layout: [(name, kind, type, options, opts)], kind 'value', 'control' or 'upload'."""
    slots = []
    for name, t, options, opts, _ in input_defs(cls):
        if not is_widget(t, opts):
            continue
        slots.append((name, "value", t, options, opts))
        if t in ("INT", "COMBO") and opts.get("control_after_generate"):
            slots.append((name, "control", t, None, opts))
        if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
            slots.append((name, "upload", t, None, opts))
    return slots


def return_types(cls):
    return [_norm_type(t) for t in cls.RETURN_TYPES]


def types_match(out_t, in_t):
    if "*" in (out_t, in_t):
        return True
    return bool(set(out_t.split(",")) & set(in_t.split(",")))


def is_file_combo(name, options, opts):
    return bool(opts.get("image_upload")) or name.endswith("_name") or re.match(r"clip_name\d$", name) is not None


def check_widget(node, name, kind, t, options, opts, value):
    where = f"node {node['id']} {node['type']}.{name}"
    if kind == "control":
        assert value in CONTROL_VALUES, f"{where}: control_after_generate {value!r}"
        return
    if kind == "upload":
        return
    if t == "COMBO":
        if options is not None and value in options:
            return
        if is_file_combo(name, options, opts):
            exts = IMAGE_EXTS if opts.get("image_upload") else MODEL_EXTS
            assert isinstance(value, str) and value.lower().endswith(exts), \
                f"{where}: {value!r} is not a {'/'.join(exts)} file name"
            return
        pytest.fail(f"{where}: {value!r} is not one of {options}")
    elif t == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an int"
        lo, hi = opts.get("min"), opts.get("max")
        assert lo is None or value >= lo, f"{where}: {value} < min {lo}"
        assert hi is None or value <= hi, f"{where}: {value} > max {hi}"
        step = opts.get("step")
        if step and lo is not None and step > 1:
            assert (value - lo) % step == 0, f"{where}: {value} is off the step {step} grid from {lo}"
    elif t == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} not a number"
        lo, hi = opts.get("min"), opts.get("max")
        assert lo is None or value >= lo, f"{where}: {value} < min {lo}"
        assert hi is None or value <= hi, f"{where}: {value} > max {hi}"
    elif t == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif t == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=WF_IDS)
def test_workflow_matches_node_definitions(comfy, path):
    check_node_definitions(comfy, load(path))


def check_node_definitions(comfy, wf):
    nodes = {n["id"]: n for n in wf["nodes"]}
    skipped = []
    for n in wf["nodes"]:
        t = n["type"]
        if t in FRONTEND_ONLY:
            continue
        cls = comfy.cls(t)
        if cls is None:
            if t in OUR_NODES and comfy.pack_error:
                skipped.append(t)
                continue
            pytest.fail(f"node {n['id']}: unknown node type {t!r} (neither stock ComfyUI nor ConvRot)")
        defs = {name: (ty, opts, req) for name, ty, _, opts, req in input_defs(cls)}
        # socket inputs: names and types as ComfyUI defines them, every required one connected
        for i in n["inputs"]:
            assert i["name"] in defs, f"node {n['id']} {t}: no input named {i['name']!r}"
            ty, opts, _ = defs[i["name"]]
            if i.get("widget") is None:
                assert not is_widget(ty, opts), f"node {n['id']} {t}.{i['name']} is a widget, not a socket"
            assert types_match(i["type"], ty), f"node {n['id']} {t}.{i['name']}: {i['type']} vs {ty}"
        have = {i["name"] for i in n["inputs"] if i["link"] is not None}
        for name, (ty, opts, req) in defs.items():
            if req and not is_widget(ty, opts):
                assert name in have, f"node {n['id']} {t}: required input {name!r} is not connected"
        rts = return_types(cls)
        assert [o["type"] for o in n["outputs"]] == rts, f"node {n['id']} {t}: outputs {rts}"
        # widget values, in the frontend's order
        slots = widget_slots(cls)
        vals = n["widgets_values"]
        assert len(vals) == len(slots), \
            f"node {n['id']} {t}: {len(vals)} widget values for {[s[0] + ('/' + s[1] if s[1] != 'value' else '') for s in slots]}"
        for (name, kind, ty, options, opts), v in zip(slots, vals):
            check_widget(n, name, kind, ty, options, opts, v)
    for lid, src, so, dst, di, typ in wf["links"]:
        s, d = nodes[src], nodes[dst]
        if s["type"] in FRONTEND_ONLY or d["type"] in FRONTEND_ONLY:
            continue
        scls, dcls = comfy.cls(s["type"]), comfy.cls(d["type"])
        if scls is not None:
            assert types_match(return_types(scls)[so], typ), f"link {lid}: source gives {return_types(scls)[so]}"
        if dcls is not None:
            dname = d["inputs"][di]["name"]
            dt = {name: ty for name, ty, *_ in input_defs(dcls)}[dname]
            assert types_match(typ, dt), f"link {lid}: {typ} into {d['type']}.{dname} ({dt})"
    if skipped:
        # the pack is this repository: failing to load it is a failure, not a reason to skip
        pytest.fail(f"{comfy.pack_error}; checked the stock nodes and links only, not {sorted(set(skipped))}")


# The graphs of the newer families: (the family's rows in docs/preset_memory.py, ComfyUI's own template for it)
FAMILY_WORKFLOWS = {
    "flux2_dev_text_to_image": (("FLUX.2 [dev] (32B)",), "image_flux2_text_to_image"),
    "flux2_klein_text_to_image": (("FLUX.2 [klein] 4B", "FLUX.2 [klein] 9B"), "image_flux2_klein_text_to_image"),
    "chroma_text_to_image": (("Chroma (8.9B)",), "image_chroma_text_to_image"),
    "qwen_image_text_to_image": (("Qwen-Image (20B)",), "image_qwen_image"),
    "wan22_14b_text_to_video": (("Wan 2.1 / 2.2 14B (per expert)",), "video_wan2_2_14B_t2v"),
}


def test_family_notes_quote_derived_memory(comfy):
    """The memory in each family graph's note is what docs/preset_memory.py --families derives (not typed in)."""
    import preset_memory  # docs/preset_memory.py

    configs = {label: (dotted, cfg) for label, dotted, cfg in preset_memory.FAMILY_CONFIGS}
    assert set(build_workflows.FAMILY_MEMORY) == set(configs)
    for label, want in build_workflows.FAMILY_MEMORY.items():
        got = preset_memory.family_bytes(*configs[label])
        assert {k: preset_memory.gb(got[k]) for k in want} == want, label
    assert set(FAMILY_WORKFLOWS) <= set(WF_IDS)
    for name, (labels, _) in FAMILY_WORKFLOWS.items():
        note = next(n for n in load(os.path.join(WORKFLOW_DIR, name + ".json"))["nodes"]
                    if n["type"] == "MarkdownNote")["widgets_values"][0]
        assert build_workflows.memory_table(*labels) in note, name


def _template_nodes(name, model_files=()):
    """The nodes that run in one of ComfyUI's own templates (inside its subgraphs too), or skip without the
    package. A template with variants in subgraphs (klein: base and distilled, one muted) gives the variant that
    loads one of `model_files` when there is one."""
    try:
        import comfyui_workflow_templates_json as t
    except ImportError:
        pytest.skip("comfyui_workflow_templates_json (a ComfyUI requirement) is not installed")
    path = os.path.join(os.path.dirname(t.__file__), "templates", name + ".json")
    if not os.path.isfile(path):
        pytest.skip(f"this templates package has no {name}.json")
    wf = load(path)
    subgraphs = {sg["id"]: sg["nodes"] for sg in wf.get("definitions", {}).get("subgraphs", [])}
    used = [n for n in wf["nodes"] if n["type"] in subgraphs]
    for_file = [n for n in used if any(m["type"] == "UNETLoader" and m["widgets_values"][0] in model_files
                                       for m in subgraphs[n["type"]])]
    used = for_file or [n for n in used if n.get("mode", 0) == 0]
    out = [n for n in wf["nodes"] if n["type"] not in subgraphs and n.get("mode", 0) == 0]
    for n in used:
        out += subgraphs[n["type"]]
    return [n for n in out if n.get("mode", 0) == 0]


# nodes of the templates that our graphs leave out (switches and primitives of their subgraph UIs, LoRA options)
TEMPLATE_ONLY = {"LoraLoaderModelOnly", "ComfySwitchNode", "PrimitiveInt", "PrimitiveFloat", "PrimitiveBoolean",
                 "PrimitiveStringMultiline", "ComfyMathExpression", "T5TokenizerOptions"}


@pytest.mark.parametrize("name", list(FAMILY_WORKFLOWS))
def test_family_graph_follows_comfyui_template(name):
    """Text encoder (file and CLIPLoader type), latent node and sampler nodes as in ComfyUI's template for the
    family; only the diffusion-model loader differs."""
    ours = [n for n in load(os.path.join(WORKFLOW_DIR, name + ".json"))["nodes"] if n["type"] not in FRONTEND_ONLY]
    files = {n["widgets_values"][0] for n in ours if n["type"] == "ConvRotW4A4Loader"}
    theirs = [n for n in _template_nodes(FAMILY_WORKFLOWS[name][1], files) if n["type"] not in FRONTEND_ONLY]
    clip = lambda nodes: {tuple(n["widgets_values"][:2]) for n in nodes if n["type"] == "CLIPLoader"}  # noqa: E731
    assert clip(ours) and clip(ours) <= clip(theirs), f"CLIPLoader {clip(ours)}; the template uses {clip(theirs)}"
    types_ours = {n["type"] for n in ours} - {"ConvRotW4A4Loader"}
    types_theirs = {n["type"] for n in theirs} - {"UNETLoader"} - TEMPLATE_ONLY
    latent = lambda ts: {t for t in ts if t.startswith("Empty") and "Latent" in t}  # noqa: E731
    assert latent(types_ours) == latent(types_theirs)
    assert types_ours == types_theirs, f"ours only: {types_ours - types_theirs}, template only: {types_theirs - types_ours}"
    assert sum(n["type"] == "ConvRotW4A4Loader" for n in ours) == sum(n["type"] == "UNETLoader" for n in theirs)


# ============================================================================ 3. headless runs


def to_api(wf, comfy):
    """The API prompt the frontend would queue for this UI graph (no widget converted to a socket here)."""
    links = {lk[0]: lk for lk in wf["links"]}
    prompt = {}
    for n in wf["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) in (2, 4):
            continue
        cls = comfy.cls(n["type"])
        names = [s[0] for s in widget_slots(cls)] if cls is not None else OUR_WIDGETS[n["type"]]
        kinds = [kind for _, kind, *_ in widget_slots(cls)] if cls is not None else ["value"] * len(names)
        inputs = {}
        for name, kind, v in zip(names, kinds, n["widgets_values"]):
            if kind == "value":
                inputs[name] = v
        for i in n["inputs"]:
            if i["link"] is not None:
                lk = links[i["link"]]
                inputs[i["name"]] = [str(lk[1]), lk[2]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs, "_meta": {"title": n.get("title", "")}}
    return prompt


# Stand-ins registered only for these runs: conditioning without text encoders, a VAE without weights.

class _TinyText:
    """Seeded conditioning of the tiny FLUX's widths in place of DualCLIPLoader + CLIPTextEncode."""

    CONTEXT, POOLED, TOKENS = 256, 256, 8

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"text": ("STRING", {"multiline": True})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "encode"
    CATEGORY = "testing"

    def encode(self, text):
        import torch

        g = torch.Generator().manual_seed(sum(text.encode()) % 2**31)
        cond = torch.randn(1, self.TOKENS, self.CONTEXT, generator=g)
        pooled = torch.randn(1, self.POOLED, generator=g)
        return ([[cond, {"pooled_output": pooled}]],)


class _TinyVAEModel:
    """FLUX latents (16 channels, /8) <-> pixels without weights: enough for VAEEncode/VAEDecode to run."""

    def decode(self, latent):
        import torch.nn.functional as F

        x = latent[:, :3].float().sigmoid()
        return F.interpolate(x, scale_factor=8, mode="nearest").movedim(1, -1)

    def encode(self, pixels):
        import torch.nn.functional as F

        x = pixels[..., :3].movedim(-1, 1).float()
        # Pool 64x (not 8x) so Kontext's ~1 megapixel reference stays a few dozen tokens on CPU.
        x = F.adaptive_avg_pool2d(x, (max(2, x.shape[2] // 64), max(2, x.shape[3] // 64)))
        return x.repeat(1, 6, 1, 1)[:, :16] * 2 - 1


class _TinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"vae_name": ("STRING", {})}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, vae_name):
        if vae_name == "ae.safetensors" or vae_name not in FAMILY_VAES:
            return (_TinyVAEModel(),)
        return (_FamilyVAEModel(vae_name, *FAMILY_VAES[vae_name]),)


# Newer families: the stock CLIPTextEncode on a stand-in CLIP. Which text encoder ComfyUI builds from a CLIPLoader
# (comfy/sd.py load_text_encoder_state_dicts, v0.29) depends on the file's model (detected from its weights; here
# from the stock file name) and, for most, the `type`; its conditioning width is that encoder's.
TE_FILES = (("mistral_3_small", "mistral3_24b"), ("qwen_3_4b", "qwen3_4b"), ("qwen_3_8b", "qwen3_8b"),
            ("qwen_2.5_vl_7b", "qwen25_7b"), ("umt5_xxl", "umt5_xxl"), ("t5xxl", "t5xxl"))
TE_WIDTH = {"flux2_te": 15360, "klein_te_qwen3_4b": 7680, "klein_te_qwen3_8b": 12288, "qwen_image_te": 3584,
            "pixart_t5": 4096, "wan_te": 4096}


def comfy_text_encoder(te_model, clip_type):
    if te_model == "mistral3_24b":
        return "flux2_te"  # whatever the type
    if te_model in ("qwen3_4b", "qwen3_8b"):
        return f"klein_te_{te_model}" if clip_type in ("flux", "flux2") else f"{te_model} as {clip_type}"
    if te_model == "qwen25_7b":
        return {"hunyuan_image": "hunyuan_image_te", "longcat_image": "longcat_image_te"}.get(clip_type,
                                                                                           "qwen_image_te")
    if te_model == "t5xxl":
        return "pixart_t5" if clip_type in ("pixart", "chroma") else f"t5xxl as {clip_type}"
    if te_model == "umt5_xxl":
        return "wan_te" if clip_type == "wan" else f"umt5_xxl as {clip_type}"
    return f"{te_model} as {clip_type}"


class _TinyClipModel:
    TOKENS = 8

    def __init__(self, width):
        self.width = width

    def tokenize(self, text, **kwargs):
        return {"text": text}

    def encode_from_tokens_scheduled(self, tokens, **kwargs):
        import torch

        g = torch.Generator().manual_seed(sum(tokens["text"].encode()) % 2**31)
        return [[torch.randn(1, self.TOKENS, self.width, generator=g), {}]]


class _TinyCLIPLoader:
    """CLIPLoader's inputs -> a stand-in CLIP giving the width of the encoder ComfyUI would build."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"clip_name": ("STRING", {}), "type": ("STRING", {})}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, clip_name, type):
        te_model = next((m for key, m in TE_FILES if key in clip_name), None)
        if te_model is None:
            raise ValueError(f"stand-in CLIP: no known text encoder in {clip_name!r}")
        te = comfy_text_encoder(te_model, type)
        if te not in TE_WIDTH:
            raise ValueError(f"CLIPLoader type {type!r} with {clip_name}: ComfyUI builds {te}, which conditions "
                             f"none of the families here")
        return (_TinyClipModel(TE_WIDTH[te]),)


# vae file -> (latent channels, spatial downscale, temporal downscale or None for an image VAE)
FAMILY_VAES = {"ae.safetensors": (16, 8, None), "flux2-vae.safetensors": (128, 16, None),
               "qwen_image_vae.safetensors": (16, 8, 4), "wan_2.1_vae.safetensors": (16, 8, 4)}


class _FamilyVAEModel:
    """Decodes latents of one family's VAE (its channels and downscaling) without weights; refuses others."""

    def __init__(self, name, channels, down, temporal):
        self.name, self.channels, self.down, self.temporal = name, channels, down, temporal

    def decode(self, latent):
        import torch.nn.functional as F

        want = 5 if self.temporal and latent.dim() == 5 else 4
        if latent.shape[1] != self.channels or latent.dim() != want and not (self.temporal and latent.dim() == 4):
            raise ValueError(f"{self.name} decodes {self.channels}-channel latents, got {list(latent.shape)}")
        x = latent[:, :3].float().sigmoid()
        if latent.dim() == 4:
            return F.interpolate(x, scale_factor=self.down, mode="nearest").movedim(1, -1)
        x = x.movedim(2, 1).flatten(0, 1)  # (B*T, 3, h, w)
        x = F.interpolate(x, scale_factor=self.down, mode="nearest").movedim(1, -1)
        b, t = latent.shape[0], latent.shape[2]
        x = x.reshape(b, t, *x.shape[1:])
        return x.repeat_interleave(self.temporal, dim=1)[:, self.temporal - 1:]  # 1 + temporal * (t - 1) frames


class _Server:
    client_id = None
    last_node_id = None
    last_prompt_id = None

    def send_sync(self, *a, **k):
        pass

    def queue_updated(self):
        pass


# (tests/tiny_families.py family, the width of the text encoder its workflow picks, the file names it loads)
TINY_FILES = (("flux2", 15360, ("flux2_dev_fp8mixed.safetensors",)),
              ("flux2_klein", 7680, ("flux-2-klein-4b.safetensors",)),
              ("chroma", 4096, ("Chroma1-HD.safetensors",)),
              ("qwen_image", 3584, ("qwen_image_fp8_e4m3fn.safetensors",)),
              ("wan", 4096, ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                             "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")))


@pytest.fixture(scope="module")
def env(comfy, tmp_path_factory):
    """Temporary models/input/output folders with tiny stand-ins under the names the workflows pick."""
    import torch
    from safetensors.torch import save_file

    from convrot.flux import FluxConfig, random_flux

    fp = comfy.folder_paths
    root = tmp_path_factory.mktemp("comfy")
    dirs = {k: root / k for k in ("diffusion_models", "loras", "input", "output", "temp")}
    for d in dirs.values():
        d.mkdir()
    saved = {k: copy.deepcopy(fp.folder_names_and_paths.get(k)) for k in ("diffusion_models", "loras")}
    saved_dirs = (fp.get_output_directory(), fp.get_input_directory(), fp.get_temp_directory())
    exts = fp.supported_pt_extensions
    fp.folder_names_and_paths["diffusion_models"] = ([str(dirs["diffusion_models"])], exts)
    fp.folder_names_and_paths["loras"] = ([str(dirs["loras"])], exts)
    fp.set_output_directory(str(dirs["output"]))
    fp.set_input_directory(str(dirs["input"]))
    fp.set_temp_directory(str(dirs["temp"]))
    if hasattr(fp, "filename_list_cache"):
        fp.filename_list_cache.clear()

    dev = random_flux(FluxConfig.tiny(), seed=0).state_dict()
    schnell = random_flux(FluxConfig.tiny(guidance=False), seed=1).state_dict()
    for name in ("flux1-dev.safetensors", "flux1-kontext-dev.safetensors"):
        save_file({k: v.contiguous() for k, v in dev.items()}, str(dirs["diffusion_models"] / name))
    save_file({k: v.contiguous() for k, v in schnell.items()}, str(dirs["diffusion_models"] / "flux1-schnell.safetensors"))
    # A rank-4 LoRA on a W4A4 layer and a W8A8 layer, in ComfyUI's diffusion_model.* naming.
    g = torch.Generator().manual_seed(3)
    lora = {}
    for layer, (o, i) in {"double_blocks.0.img_attn.qkv": (768, 256), "double_blocks.0.img_attn.proj": (256, 256),
                          "single_blocks.0.linear1": (1792, 256)}.items():
        lora[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(4, i, generator=g).to(torch.bfloat16)
        lora[f"diffusion_model.{layer}.lora_up.weight"] = (0.5 * torch.randn(o, 4, generator=g)).to(torch.bfloat16)
    save_file(lora, str(dirs["loras"] / "your_flux_lora.safetensors"))
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(dirs["input"] / "example.png")

    # The newer families: tiny instances of ComfyUI's classes with the real text encoders' widths.
    import types

    import comfy.model_detection as md
    import convrot.families
    from tiny_families import tiny_detect_unet_config, tiny_state_dict

    pack = comfy.pack or types.SimpleNamespace(convrot=types.SimpleNamespace(families=convrot.families))
    for family, width, names in TINY_FILES:
        for seed, name in enumerate(names):
            save_file(tiny_state_dict(family, pack, context_dim=width, seed=seed), str(dirs["diffusion_models"] / name))
    orig_detect = md.detect_unet_config
    md.detect_unet_config = tiny_detect_unet_config(orig_detect)

    comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotTestTinyText"] = _TinyText
    comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotTestTinyVAE"] = _TinyVAE
    comfy.nodes.NODE_CLASS_MAPPINGS["ConvRotTestTinyCLIP"] = _TinyCLIPLoader
    yield dirs
    md.detect_unet_config = orig_detect
    comfy.nodes.NODE_CLASS_MAPPINGS.pop("ConvRotTestTinyText", None)
    comfy.nodes.NODE_CLASS_MAPPINGS.pop("ConvRotTestTinyVAE", None)
    comfy.nodes.NODE_CLASS_MAPPINGS.pop("ConvRotTestTinyCLIP", None)
    for k, v in saved.items():
        if v is None:
            fp.folder_names_and_paths.pop(k, None)
        else:
            fp.folder_names_and_paths[k] = v
    fp.set_output_directory(saved_dirs[0])
    fp.set_input_directory(saved_dirs[1])
    fp.set_temp_directory(saved_dirs[2])
    if hasattr(fp, "filename_list_cache"):
        fp.filename_list_cache.clear()


def shrink(prompt, stock_loader=False):
    """Tiny stand-ins and sizes: no text encoders or VAE files, 64x64, 2 steps."""
    out = {}
    for nid, node in prompt.items():
        node = copy.deepcopy(node)
        t, inp = node["class_type"], node["inputs"]
        if t == "DualCLIPLoader":
            continue
        if t == "CLIPTextEncode" and prompt[inp["clip"][0]]["class_type"] == "DualCLIPLoader":  # FLUX.1
            node = {"class_type": "ConvRotTestTinyText", "inputs": {"text": inp["text"]}}
        elif t == "VAELoader":
            node = {"class_type": "ConvRotTestTinyVAE", "inputs": {"vae_name": inp["vae_name"]}}
        elif t == "CLIPLoader":
            node = {"class_type": "ConvRotTestTinyCLIP", "inputs": {"clip_name": inp["clip_name"], "type": inp["type"]}}
        elif t in ("EmptySD3LatentImage", "EmptyFlux2LatentImage"):
            inp.update(width=64, height=64)
        elif t == "EmptyHunyuanLatentVideo":
            inp.update(width=64, height=64, length=5)
        elif t == "KSampler":
            inp["steps"] = 2
        elif t == "Flux2Scheduler":
            inp.update(steps=2, width=64, height=64)
        elif t == "BasicScheduler":
            inp["steps"] = 2
        elif t == "KSamplerAdvanced":  # the two experts: one step each
            inp.update(steps=2, start_at_step=min(inp["start_at_step"], 1), end_at_step=min(inp["end_at_step"], 1)
                       if inp["end_at_step"] < 100 else inp["end_at_step"])
        elif t == "ConvRotW4A4Loader" and stock_loader:
            node = {"class_type": "UNETLoader", "inputs": {"unet_name": inp["unet_name"], "weight_dtype": "default"}}
        out[nid] = node
    return out


def run_prompt(comfy, prompt):
    import execution

    pid = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(pid, prompt, None))
    assert valid[0], f"ComfyUI rejects the prompt: {valid[1]} {json.dumps(valid[3], default=str)[:2000]}"
    ex = execution.PromptExecutor(_Server(), cache_type=False, cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
    ex.execute(prompt, pid, {}, valid[2])
    errors = [d for ev, d in ex.status_messages if ev == "execution_error"]
    assert ex.success and not errors, "run failed:\n" + "\n".join(
        f"{e['node_type']} (node {e['node_id']}): {e['exception_type']}: {e['exception_message']}\n"
        + "".join(e.get("traceback", [])[-14:]) for e in errors)
    return ex.history_result["outputs"]


def images(outputs, env):
    from PIL import Image
    import numpy as np

    files = [im for out in outputs.values() for im in out.get("images", [])]
    out = []
    for f in files:
        path = os.path.join(env["output"], f["subfolder"], f["filename"])
        if path.endswith((".mp4", ".webm", ".mkv")):  # SaveVideo: the frames, (T, H, W, 3)
            import av

            with av.open(path) as c:
                out.append(np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)]))
        else:
            out.append(np.asarray(Image.open(path)))
    return out


RESULTS: dict[str, list] = {}


def check_size(imgs):
    """The picture (or every frame) is the size the shrunk latent node asks for. ComfyUI resizes the channels of an
    empty latent of the wrong kind to the model's (comfy.sample.fix_empty_latent_channels), so a wrong latent node
    runs but makes a picture of the wrong size."""
    for im in imgs:
        assert im.shape[-3:] == (64, 64, 3), f"asked for 64x64, got {im.shape}: wrong latent node for this model?"
        assert im.ndim == 3 or im.shape[0] == 5, f"asked for a 5-frame clip, got {im.shape[0]} frames"


RUN_ORDER = ["flux1_dev_text_to_image", "flux1_dev_lora", "flux1_schnell_text_to_image",
             "flux1_kontext_dev_image_edit", "flux1_dev_quantize_and_save", "flux1_dev_load_saved_w4a4"]


@pytest.mark.parametrize("name", RUN_ORDER + [w for w in WF_IDS if w not in RUN_ORDER])
def test_workflow_runs_headless(comfy, env, name):
    wf = load(os.path.join(WORKFLOW_DIR, name + ".json"))
    if comfy.pack_error and name in ("flux1_dev_quantize_and_save", "flux1_dev_load_saved_w4a4"):
        pytest.fail(f"{comfy.pack_error}: this graph needs the ConvRot nodes")
    prompt = to_api(wf, comfy)
    if comfy.pack_error:
        outputs = run_prompt(comfy, shrink(prompt, stock_loader=True))
        assert images(outputs, env)
        pytest.fail(f"{comfy.pack_error}: ran the graph with the stock UNETLoader in place of ConvRot W4A4 Loader "
                    "(stock nodes work); the ConvRot part is untested")
    if name == "flux1_dev_load_saved_w4a4":
        saved = env["diffusion_models"] / build_workflows.SAVED_FILE
        if not saved.exists():
            run_prompt(comfy, shrink(to_api(load(os.path.join(WORKFLOW_DIR, "flux1_dev_quantize_and_save.json")),
                                             comfy)))
        if comfy.folder_paths and hasattr(comfy.folder_paths, "filename_list_cache"):
            comfy.folder_paths.filename_list_cache.clear()
    outputs = run_prompt(comfy, shrink(prompt))
    if name == "flux1_dev_quantize_and_save":
        saved = env["diffusion_models"] / build_workflows.SAVED_FILE
        assert saved.is_file(), f"ConvRot Save Quantized wrote {os.listdir(env['diffusion_models'])}, " \
                                f"not {build_workflows.SAVED_FILE}"
        from convrot.checkpoint import read_header

        infos, _ = read_header(str(saved))
        assert any(k.endswith("comfy_quant") for k in infos), "the saved file holds no quantized layer"
        return
    imgs = images(outputs, env)
    assert len(imgs) == 1 and imgs[0].shape[-1] == 3
    if name in FAMILY_WORKFLOWS:
        check_size(imgs)
    assert imgs[0].std() > 0, "a flat image: the sampler produced nothing"
    RESULTS[name] = imgs
    if name == "flux1_dev_lora" and "flux1_dev_text_to_image" in RESULTS:
        a, b = RESULTS["flux1_dev_text_to_image"][0], imgs[0]
        assert a.shape == b.shape and (a != b).any(), "the LoRA changed nothing: it was not applied"
    if name == "flux1_dev_load_saved_w4a4" and "flux1_dev_text_to_image" in RESULTS:
        a, b = RESULTS["flux1_dev_text_to_image"][0], imgs[0]
        # Same tiny model, same preset and group size: loading the saved file must give the same picture.
        assert a.shape == b.shape
        diff = abs(a.astype(int) - b.astype(int)).mean()
        assert diff <= 2.0, f"saved file gives a different image than on-the-fly quantization (mean |diff| {diff})"



def _mutate(name, type_=None, new_type=None, widget=None):
    wf = load(os.path.join(WORKFLOW_DIR, name + ".json"))
    for n in wf["nodes"]:
        if n["type"] == type_:
            if new_type:
                n["type"] = new_type
            if widget:
                n["widgets_values"][widget[0]] = widget[1]
    return wf


# (workflow, node type, replacement type, (widget index, value)), and the layer that must refuse it
WRONG = {
    "node name": ("flux2_dev_text_to_image", "EmptyFlux2LatentImage", "EmptyFlux2Latent", None, 2),
    # (EmptySD3LatentImage in a FLUX.2 graph is no mistake in v0.29: an empty latent that says its downscale ratio is
    # resized to the model's channels and ratio by comfy.sample.fix_empty_latent_channels, and the picture comes
    # out right; EmptyFlux2LatentImage in a Chroma graph comes out at half the size.)
    "latent node, Chroma": ("chroma_text_to_image", "EmptySD3LatentImage", "EmptyFlux2LatentImage", None, 3),
    "latent node, Wan": ("wan22_14b_text_to_video", "EmptyHunyuanLatentVideo", "EmptySD3LatentImage", None, 2),
    "CLIP type, klein": ("flux2_klein_text_to_image", "CLIPLoader", None, (1, "qwen_image"), 3),
    "CLIP type, Chroma": ("chroma_text_to_image", "CLIPLoader", None, (1, "sd3"), 3),
    "CLIP type, Wan": ("wan22_14b_text_to_video", "CLIPLoader", None, (1, "chroma"), 3),
    "text encoder, FLUX.2 dev": ("flux2_dev_text_to_image", "CLIPLoader", None, (0, "qwen_3_4b.safetensors"), 3),
    "VAE, Qwen-Image": ("qwen_image_text_to_image", "VAELoader", None, (0, "flux2-vae.safetensors"), 3),
}


@pytest.mark.parametrize("what", list(WRONG))
def test_wrong_choices_fail(comfy, env, what):
    """The layers above can fail: a graph with a wrong node name, latent node, CLIP type or file is refused."""
    name, type_, new_type, widget, layer = WRONG[what]
    wf = _mutate(name, type_, new_type, widget)
    if layer == 2:
        with pytest.raises((AssertionError, pytest.fail.Exception)):
            check_node_definitions(comfy, wf)
        return
    check_node_definitions(comfy, wf)  # valid as a graph: only running it shows the mistake
    if comfy.pack_error:
        pytest.fail(comfy.pack_error)
    with pytest.raises(AssertionError, match="run failed|rejects|asked for"):
        check_size(images(run_prompt(comfy, shrink(to_api(wf, comfy))), env))
