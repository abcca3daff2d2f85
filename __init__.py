"""ComfyUI-ConvRot: FLUX transformers in W4A4 with ConvRot. ComfyUI loads this folder as a custom node package."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # imported here so that importing the package outside ComfyUI (tests, the CLI) never needs ComfyUI
    from .nodes import ConvRotExtension
    return ConvRotExtension()
