#!/bin/bash
# Builds the device carries on this (CPU) machine, for a fresh checkout:
#   .gpu/   wheels the GPU machine lacks (Python 3.12, manylinux x86_64), comfy-kitchen 0.2.24 (ComfyUI v0.29's pin)
#           with its CUDA library xz'd, ComfyUI's source as comfyui.tar.xz (no tests, no tokenizer data); < 64 MiB
#   .ck36/  comfy-kitchen 0.2.36 alone (its INT8 attention; the CUDA library xz'd, no HIP library): carried alone
# Usage: bash bench/make_carry.sh [ComfyUI source dir, default $COMFYUI_PATH or /work/ComfyUI]
# Both paths are ignored by git (add them to .git/info/exclude); gpu_server.sh and attention runs read them.
set -euo pipefail
cd "$(dirname "$0")/.."
comfy=${1:-${COMFYUI_PATH:-/work/ComfyUI}}
[ -f "$comfy/main.py" ] || { echo "no ComfyUI source at $comfy" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
plat=(--only-binary=:all: --no-deps --python-version 3.12 --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any)
rm -rf .gpu .ck36 && mkdir -p .gpu/whl
pip download -q "${plat[@]}" -d .gpu/whl torchsde trampoline alembic mako 'sqlalchemy==2.1.9' greenlet \
  comfy-aimdo==0.4.10 simpleeval blake3 'pydantic==2.14.4' 'pydantic-core==2.50.5' pydantic-settings python-dotenv \
  annotated-types typing-inspection 'typing_extensions==4.16.*' nvidia-cutlass==4.2.0.0
kitchen() {  # version, destination: the package and its dist-info, the CUDA library xz'd, the HIP one left out
  pip download -q "${plat[@]}" -d "$tmp/ck$1" "comfy-kitchen==$1"
  mkdir -p "$2" && (cd "$2" && python3 -m zipfile -e "$tmp"/ck"$1"/*.whl .)
  rm -rf "$2/comfy_kitchen/backends/hip"
  xz -T2 -6 "$2/comfy_kitchen/backends/cuda/_C.abi3.so"
}
kitchen 0.2.24 .gpu/kitchen
kitchen 0.2.36 .ck36
base=$(basename "$comfy")  # tar's names start with it; --transform renames it ComfyUI (gpu_server.sh's /tmp/ComfyUI)
tar -C "$(dirname "$comfy")" --transform "s,^$base,ComfyUI," --exclude='*/tests' --exclude='*/tests-unit' \
  --exclude="$base/comfy/text_encoders/*_tokenizer" --exclude="$base/comfy/sd1_tokenizer" --exclude='__pycache__' \
  -cJf .gpu/comfyui.tar.xz "$base"
du -sh .gpu .ck36
