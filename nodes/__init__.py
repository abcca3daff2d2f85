"""ComfyUI nodes of the ConvRot pack (V3 node API). Imported only inside ComfyUI."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import layout
from .attention import ConvRotQuantizedAttention
from .compile import ConvRotCompileBlocks
from .graph import ConvRotCUDAGraph
from .loader import ConvRotW4A4Loader
from .save import ConvRotSaveQuantized

layout.register()  # ConvRot QuantizedTensors (ours, and native files under stock loaders) run on ConvRot kernels

NODES = [ConvRotW4A4Loader, ConvRotSaveQuantized, ConvRotCompileBlocks, ConvRotCUDAGraph, ConvRotQuantizedAttention]


class ConvRotExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)
