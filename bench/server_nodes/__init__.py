"""Benchmark-only ComfyUI node (not part of the pack): conditioning tensors from a safetensors file, in place of the
text encoders, so the server harness (bench/server_bench.py) can queue the shipped graphs without CLIP/T5 weights.
The harness links this folder into ComfyUI/custom_nodes for its own servers only."""
from safetensors.torch import load_file


class ConvRotBenchConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"path": ("STRING", {"default": ""})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, path):
        t = load_file(path)
        return ([[t["cond"], {"pooled_output": t["pooled"]} if "pooled" in t else {}]],)  # FLUX.1 only has one


NODE_CLASS_MAPPINGS = {"ConvRotBenchConditioning": ConvRotBenchConditioning}
