"""Start ComfyUI's main.py for the server harness, with inert stubs for packages that fail to import here
(torchvision/torchaudio on a CPU torch, PyAV on a machine without it; tools/cpu_torch_stubs.py). Only nodes the
benchmark never runs need them.

    python bench/server_launch.py path/to/ComfyUI/main.py [ComfyUI arguments]
"""
import runpy
import sys
from pathlib import Path

TOOLS = Path(__file__).resolve().parents[1] / "tools"

if __name__ == "__main__":
    sys.path.insert(0, str(TOOLS))
    import cpu_torch_stubs

    # PyAV only where it is missing; torchvision/torchaudio only for a CPU server, because importing them imports
    # torch, which must not happen before main.py configures CUDA's allocator
    stubbed = cpu_torch_stubs.install(("av",) + (tuple(cpu_torch_stubs.DEFAULT) if "--cpu" in sys.argv else ()))
    sys.path.remove(str(TOOLS))
    if stubbed:
        print(f"server_launch: stubbed {', '.join(stubbed)}", flush=True)
    main_py = Path(sys.argv[1]).resolve()
    sys.argv = [str(main_py), *sys.argv[2:]]
    sys.path.insert(0, str(main_py.parent))
    runpy.run_path(str(main_py), run_name="__main__")
