"""Shared pytest fixtures. ComfyUI-specific ones live in tests/comfy_env.py (in-process ComfyUI on the CPU)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfy_env import comfy  # noqa: E402,F401  (session fixture: ComfyUI + this pack loaded as a custom node)
