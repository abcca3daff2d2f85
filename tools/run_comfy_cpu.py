"""Start ComfyUI on a CPU-only torch, with stubs for the torchvision/torchaudio wheels that cannot load against it.

From the ComfyUI folder:

    python custom_nodes/ComfyUI-ConvRot/tools/run_comfy_cpu.py main.py --cpu [other ComfyUI arguments]

The first argument is ComfyUI's main.py (default: ./main.py, else the main.py two folders above this pack); the
rest go to ComfyUI unchanged. torchvision/torchaudio are imported for real when they load and stubbed only when
they fail (tools/cpu_torch_stubs.py); a stubbed package raises as soon as something calls into it, so video/audio
nodes fail with a clear message while image workflows (FLUX included) run. Not needed with a CUDA torch.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _main_py(argv: list[str]) -> tuple[Path, list[str]]:
    if argv and argv[0].endswith(".py"):
        return Path(argv[0]).resolve(), argv[1:]
    for cand in (Path.cwd() / "main.py", Path(__file__).absolute().parents[3] / "main.py"):
        if cand.is_file():
            return cand.resolve(), argv
    sys.exit("run_comfy_cpu.py: ComfyUI's main.py not found; run it from the ComfyUI folder or pass "
             "path/to/ComfyUI/main.py as the first argument")


def main(argv: list[str] | None = None) -> None:
    main_py, rest = _main_py(list(sys.argv[1:] if argv is None else argv))
    if not main_py.is_file():
        sys.exit(f"run_comfy_cpu.py: {main_py} does not exist")
    sys.path.insert(0, str(HERE))
    import cpu_torch_stubs

    stubbed = cpu_torch_stubs.install()
    sys.path.remove(str(HERE))
    if stubbed:
        print(f"run_comfy_cpu.py: {', '.join(stubbed)} could not be imported; using inert stubs "
              "(nodes that need them will fail when run)", file=sys.stderr, flush=True)
    comfy_dir = str(main_py.parent)
    sys.argv = [str(main_py), *rest]
    sys.path.insert(0, comfy_dir)
    runpy.run_path(str(main_py), run_name="__main__")


if __name__ == "__main__":
    main()
