"""A real ComfyUI, imported in-process on the CPU, for the tests of the ComfyUI nodes (tests/test_comfy_*.py).

ComfyUI is searched, in this order, at $COMFYUI_PATH, at the parent of `custom_nodes` when this pack is cloned as
ComfyUI/custom_nodes/ComfyUI-ConvRot (the normal install layout), and at ../ComfyUI beside this repository; without
it the tests are skipped with that reason. `python tests/comfy_env.py --print-path [EXTRA_DIR...]` prints the
folder this search finds (EXTRA_DIRs are tried last; .ci/run uses it) or exits 1.

torchvision/torchaudio wheels for CUDA torch do not load against a CPU torch, so when they fail to import they are
replaced by inert stub modules (tools/cpu_torch_stubs.py, the same helper users run ComfyUI with on a CPU torch);
ComfyUI imports them at module level for audio/video models the tests never touch. The pack itself is loaded the
way ComfyUI loads a custom node: nodes.load_custom_node() on a folder named `ComfyUI-ConvRot` (a symlink to this
repository), which exercises the V3 `comfy_entrypoint` and the package-relative imports.
"""
from __future__ import annotations

import asyncio
import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-ConvRot"


def _is_comfyui(p: Path) -> bool:
    return (p / "comfy" / "sd.py").is_file() and (p / "nodes.py").is_file()


def comfyui_candidates(extra=()) -> list[Path]:
    """Where ComfyUI is looked for, in order (see the module docstring)."""
    cands = []
    if os.environ.get("COMFYUI_PATH"):
        cands.append(Path(os.environ["COMFYUI_PATH"]))
    # custom_nodes/ComfyUI-ConvRot: the folder as named (it may be a symlink into custom_nodes) and as resolved
    repos = [Path(__file__).absolute().parents[1], REPO]
    pwd = os.environ.get("PWD")  # the shell's logical folder keeps a symlinked custom_nodes/ComfyUI-ConvRot
    if pwd and Path(pwd).resolve() == REPO:
        repos.insert(0, Path(pwd))
    for repo in repos:
        if repo.parent.name == "custom_nodes":
            cands.append(repo.parent.parent)
    cands.append(REPO.parent / "ComfyUI")
    cands += [Path(e) for e in extra]
    return cands


def comfyui_path(extra=()) -> Path | None:
    for p in comfyui_candidates(extra):
        if _is_comfyui(p):
            return p.resolve()
    return None


def _not_found_reason() -> str:
    return ("ComfyUI not found: clone this pack into ComfyUI/custom_nodes/, or set COMFYUI_PATH to a ComfyUI "
            "checkout (searched: " + ", ".join(str(p) for p in comfyui_candidates()) + ")")


def install_stubs() -> list[str]:
    """tools/cpu_torch_stubs.install(): stub torchvision/torchaudio when they do not load; the stubbed names."""
    tools = str(REPO / "tools")
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import cpu_torch_stubs
    return cpu_torch_stubs.install()


class ComfyEnv(types.SimpleNamespace):
    """Handles to the imported ComfyUI modules, the loaded pack and the temporary models folder."""


_ENV: ComfyEnv | None = None


def setup_comfy(models_dir: Path) -> ComfyEnv:
    global _ENV
    if _ENV is not None:
        return _ENV
    path = comfyui_path()
    if path is None:
        pytest.skip(_not_found_reason())
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    stubbed = install_stubs()
    try:
        return _import_comfy(path, models_dir, stubbed)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        if not top or (path / top).is_dir() or (path / f"{top}.py").exists() or os.environ.get("CONVROT_TEST_STRICT"):
            raise  # ComfyUI's own module is missing: a wrong or broken checkout, not a missing package
        # a package ComfyUI's requirements.txt names is not installed here (e.g. av on a bare GPU machine)
        pytest.skip(f"ComfyUI at {path} cannot be imported here: {e} (install its requirements.txt)")


def _import_comfy(path: Path, models_dir: Path, stubbed: list[str]) -> ComfyEnv:
    global _ENV
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.disable_smart_memory = False
    import comfy.model_management as mm
    assert mm.get_torch_device().type == "cpu", "ComfyUI must run on the CPU in these tests"
    import folder_paths
    for kind in ("diffusion_models", "loras"):
        d = models_dir / kind
        d.mkdir(parents=True, exist_ok=True)
        folder_paths.add_model_folder_path(kind, str(d), is_default=True)
    import comfy.sd  # noqa: F401
    import comfy.sample  # noqa: F401
    import nodes

    link_root = models_dir.parent / "custom_nodes"
    link_root.mkdir(exist_ok=True)
    link = link_root / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    ok = asyncio.run(nodes.load_custom_node(str(link)))
    assert ok, "ComfyUI could not load the pack (see the log above)"
    pack = sys.modules[str(link).replace(".", "_x_")]
    _ENV = ComfyEnv(path=path, models_dir=models_dir, nodes=nodes, folder_paths=folder_paths, mm=mm, pack=pack,
                    stubbed=stubbed, pack_dir=link)
    return _ENV


@pytest.fixture(scope="session")
def comfy(tmp_path_factory) -> ComfyEnv:
    """ComfyUI imported on the CPU with a temporary models folder and this pack loaded as a custom node."""
    return setup_comfy(tmp_path_factory.mktemp("comfy") / "models")


# ---------------------------------------------------------------------------- tiny FLUX files and sampling helpers

TINY_NAME = "tiny_flux.safetensors"
LATENT_HW = 16   # 16x16 latent -> 8x8 = 64 image tokens
TXT_LEN = 16


def tiny_config():
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from convrot.flux import FluxConfig
    return FluxConfig.tiny(hidden=256, depth=2, single=2)


def tiny_state_dict(seed: int = 0):
    import torch
    from convrot.flux import random_flux
    m = random_flux(tiny_config(), seed=seed, dtype=torch.bfloat16)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


def write_file(env: ComfyEnv, name: str, sd: dict, metadata: dict | None = None) -> Path:
    import safetensors.torch
    path = env.models_dir / "diffusion_models" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path), metadata=metadata)
    return path


def conditioning(seed: int = 0, guidance: float = 3.5):
    """FLUX conditioning as the text encoders would give it: [[cond [1, L, context_in_dim], {pooled, guidance}]]."""
    import torch
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, TXT_LEN, cfg.context_in_dim, generator=g)
    pooled = torch.randn(1, cfg.vec_in_dim, generator=g)
    return [[cond, {"pooled_output": pooled, "guidance": guidance}]]


def sample(env: ComfyEnv, model, cond=None, seed: int = 1, steps: int = 2, cfg: float = 1.0):
    """KSampler (euler/simple, cfg 1 as for FLUX dev) from an empty latent; returns the latent tensor."""
    import torch
    cond = cond if cond is not None else conditioning()
    latent = {"samples": torch.zeros(1, 16, LATENT_HW, LATENT_HW)}
    out = env.nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", cond, cond, latent)
    return out[0]["samples"].float()


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def node_output(out):
    """The outputs tuple of a V3 node's NodeOutput (or a V1 node's tuple)."""
    return out.result if hasattr(out, "result") else out


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--print-path":
        found = comfyui_path(sys.argv[2:])
        if found is None:
            print(_not_found_reason(), file=sys.stderr)
            sys.exit(1)
        print(found)
    else:
        sys.exit("usage: python tests/comfy_env.py --print-path [EXTRA_DIR...]")
