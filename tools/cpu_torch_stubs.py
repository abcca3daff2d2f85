"""Inert stand-ins for torchvision/torchaudio when they cannot load, so ComfyUI starts on a CPU-only torch.

The torchvision/torchaudio wheels that pip picks from PyPI are built for a CUDA torch; against a CPU torch they
fail at import (`operator torchvision::nms does not exist`), and ComfyUI imports both at start for video/audio
models. `install()` tries the real packages first and replaces only the ones that fail (or are missing) by stub
modules: every attribute is another stub, and *calling* anything raises, so a node that really needs
torchvision/torchaudio fails loudly instead of computing nonsense. FLUX image generation does not use them.

This file is outside the pack's import path on purpose: ComfyUI never loads it. Two users:
- tools/run_comfy_cpu.py (start ComfyUI on a CPU torch: `python tools/run_comfy_cpu.py main.py --cpu`);
- tests/comfy_env.py (the in-process ComfyUI of the tests).
"""
from __future__ import annotations

import importlib.machinery
import sys
import types

DEFAULT = ("torchvision", "torchaudio")


class StubModule(types.ModuleType):
    """A module whose every attribute is another stub; calling one raises."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        full = f"{self.__name__}.{name}"
        m = sys.modules.get(full)
        if m is None:
            # a package, so that `import a.b.c` works after `a.b` was first reached as an attribute
            m = StubModule(full)
            m.__spec__ = importlib.machinery.ModuleSpec(full, StubFinder, is_package=True)
            m.__path__ = []
            sys.modules[full] = m
        setattr(self, name, m)
        return m

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self.__name__} is a stub: torchvision/torchaudio do not load against this torch "
                           "(tools/cpu_torch_stubs.py)")

    def __mro_entries__(self, bases):
        return (object,)


class StubFinder:
    """Meta-path finder that serves StubModule packages for the stubbed top-level names."""

    roots: set[str] = set()

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname.split(".")[0] in cls.roots:
            return importlib.machinery.ModuleSpec(fullname, cls, is_package=True)
        return None

    @staticmethod
    def create_module(spec):
        m = StubModule(spec.name)
        m.__path__ = []
        return m

    @staticmethod
    def exec_module(module):
        pass


def stub_if_broken(name: str) -> bool:
    """Import `name`; if that fails for any reason, serve a stub package under that name. True if stubbed."""
    if name in StubFinder.roots:
        return True
    try:
        __import__(name)
        return False
    except Exception:
        pass
    for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[k]
    if StubFinder not in sys.meta_path:
        sys.meta_path.insert(0, StubFinder)
    StubFinder.roots.add(name)
    __import__(name)
    return True


def install(names=DEFAULT) -> list[str]:
    """Stub every package of `names` that does not import; returns the stubbed names."""
    return [n for n in names if stub_if_broken(n)]
