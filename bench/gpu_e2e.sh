#!/bin/bash
# One device call for the ComfyUI end-to-end bench: install the carried wheels, build the extension while the 12B
# random checkpoint is written, run a quick GPU test subset, then the listed variants.
# Usage on the device: bash bench/gpu_e2e.sh "<variants>" "<variants to profile>" ["all" | "<pytest -k expr>"]
# Needs .gpu/ComfyUI, .gpu/whl and .whl carried (see bench/e2e_comfy.py's docstring). Results under $OUT.
set -o pipefail
variants=$1; profile=$2; tests=${3:-}
export PYTHONUNBUFFERED=1 MAX_JOBS=16 CONVROT_CACHE_DIR=$PWD/.build/cache
W=/tmp/convrot_e2e
mkdir -p $OUT/logs
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --find-links .gpu/whl --find-links .whl torchsde trampoline alembic \
  mako sqlalchemy greenlet comfy_aimdo simpleeval blake3 einops pydantic_settings python_dotenv comfy_kitchen \
  nvidia_cutlass 2>&1 | tail -3
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  python3 -c "import torch;print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } | tee $OUT/env.txt
python3 -c "
import logging, time; logging.basicConfig(level=logging.INFO)
t=time.time(); from convrot import kernels; print('kernels:', kernels.load() is not None, kernels.unavailable_reason(), f'{time.time()-t:.0f} s')
" > $OUT/build.txt 2>&1 &
build=$!
if [ ! -f $W/flux1-dev-random.safetensors ]; then
  mkdir -p $W && python3 -c "
import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import e2e_comfy as e
e.write_random_flux(Path('$W/flux1-dev-random.safetensors'), False)" 2>&1 | tail -2
fi
wait $build; tail -2 $OUT/build.txt; echo "setup $(( $(date +%s) - t0 )) s"
if [ -n "$tests" ]; then  # "all", or a pytest -k expression
  sel=(); [ "$tests" != all ] && sel=(-k "$tests")
  timeout 240 python3 -m pytest -q tests/test_kernels_gpu.py tests/test_lowrank.py tests/test_graphs.py \
    -p no:cacheprovider "${sel[@]}" 2>&1 | tail -25 | tee $OUT/tests.txt
fi
timeout $(( 585 - ($(date +%s) - t0) )) python3 bench/e2e_comfy.py --comfy .gpu/ComfyUI --workdir $W \
  --variants "$variants" --profile "$profile" --out $OUT/e2e.jsonl --log-dir $OUT/logs 2>&1 | tee $OUT/e2e.txt | grep -v "^{" | tail -40
for f in $OUT/logs/*.log; do echo "=== $f"; tail -c 300000 $f; done > $OUT/child_logs.txt 2>/dev/null; rm -rf $OUT/logs
echo "total $(( $(date +%s) - t0 )) s"
