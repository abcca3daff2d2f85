"""A real ComfyUI, imported in-process on the CPU, for the tests of the ComfyUI nodes (tests/test_comfy_*.py).

ComfyUI is found through $COMFYUI_PATH, else ../ComfyUI beside this repository; without it the tests are skipped
with that reason. torchvision/torchaudio wheels for CUDA torch do not load against a CPU torch, so when they fail
to import they are replaced *for the tests only* by inert stub modules (ComfyUI imports them at module level for
audio/video models the tests never touch). The pack itself is loaded the way ComfyUI loads a custom node:
nodes.load_custom_node() on a folder named `ComfyUI-ConvRot` (a symlink to this repository), which exercises the
V3 `comfy_entrypoint` and the package-relative imports.
"""
from __future__ import annotations

import asyncio
import importlib.machinery
import os
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACK_DIR_NAME = "ComfyUI-ConvRot"


def comfyui_path() -> Path | None:
    for p in (os.environ.get("COMFYUI_PATH"), REPO.parent / "ComfyUI"):
        if p and (Path(p) / "comfy" / "sd.py").is_file() and (Path(p) / "nodes.py").is_file():
            return Path(p).resolve()
    return None


class _StubModule(types.ModuleType):
    """A module whose every attribute is another stub; calling one raises (nothing in the tests may use it)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        m = sys.modules.get(full) or _StubModule(full)
        m.__spec__ = importlib.machinery.ModuleSpec(full, None)
        sys.modules[full] = m
        setattr(self, name, m)
        return m

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.__name__} is a test stub (torchvision/torchaudio are not usable here)")

    def __mro_entries__(self, bases):
        return (object,)


class _StubFinder:
    roots: set[str] = set()

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in cls.roots:
            return importlib.machinery.ModuleSpec(fullname, cls, is_package=True)
        return None

    @staticmethod
    def create_module(spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        return m

    @staticmethod
    def exec_module(module):
        pass


def _stub_if_broken(name: str) -> bool:
    try:
        __import__(name)
        return False
    except Exception:
        pass
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]
    if _StubFinder not in sys.meta_path:
        sys.meta_path.insert(0, _StubFinder)
    _StubFinder.roots.add(name)
    __import__(name)
    return True


class ComfyEnv(types.SimpleNamespace):
    """Handles to the imported ComfyUI modules, the loaded pack and the temporary models folder."""


_ENV: ComfyEnv | None = None


def setup_comfy(models_dir: Path) -> ComfyEnv:
    global _ENV
    if _ENV is not None:
        return _ENV
    path = comfyui_path()
    if path is None:
        pytest.skip("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or put one at ../ComfyUI)")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    stubbed = [n for n in ("torchvision", "torchaudio") if _stub_if_broken(n)]

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
