#!/bin/bash
# One device call for the server harness: install the carried packages and ComfyUI into /tmp (kept while the machine
# stays warm), build the extension while the 12B random checkpoint is written, run GPU tests, then the harness.
# Usage on the device: bash bench/gpu_server.sh "<modes>" "<variants>" "<pytest files or none>" [harness args]
# (TINY=1 skips writing the 12B checkpoint: for harness runs with --tiny --workdir elsewhere)
# Carries .gpu/ (see bench/NOTES.md "Server harness": wheels, comfy-kitchen with its xz'd CUDA library, ComfyUI).
set -o pipefail
modes=$1; variants=$2; tests=${3:-none}; shift 3
export PYTHONUNBUFFERED=1 MAX_JOBS=16 CONVROT_CACHE_DIR=/tmp/convrot_cache PYTHONPATH=/tmp/site
W=/tmp/srv
t0=$(date +%s)
stamp=$(ls .gpu/whl | md5sum | cut -c1-8)  # a warm machine keeps /tmp/site: reinstall when the wheels change
if [ "$(cat /tmp/site/.done 2>/dev/null)" != "$stamp" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl 2>&1 | tail -2
  cp -r .gpu/kitchen/. /tmp/site/
  xz -dc .gpu/kitchen/comfy_kitchen/backends/cuda/_C.abi3.so.xz > /tmp/site/comfy_kitchen/backends/cuda/_C.abi3.so
  rm -f /tmp/site/comfy_kitchen/backends/cuda/_C.abi3.so.xz && echo "$stamp" > /tmp/site/.done
fi
[ -f /tmp/ComfyUI/comfy/text_encoders/spiece_tokenizer.py ] || { rm -rf /tmp/ComfyUI; tar -xJf .gpu/comfyui.tar.xz -C /tmp; }
[ -f .gpu/build.tar.xz ] && [ ! -d /tmp/convrot_cache ] && tar -xJf .gpu/build.tar.xz -C /tmp
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} | tee -a $OUT/env.txt
python3 -c "
import time; t=time.time(); from convrot import kernels
print('kernels:', kernels.load() is not None, kernels.unavailable_reason(), f'{time.time()-t:.0f} s')" >> $OUT/env.txt 2>&1 &
build=$!
mkdir -p $W/models/diffusion_models
[ -n "${TINY:-}" ] || [ -f $W/models/diffusion_models/flux1-dev-random.safetensors ] || python3 -c "
import sys; sys.path.insert(0, 'bench'); from pathlib import Path; import e2e_comfy as e
e.write_random_flux(Path('$W/models/diffusion_models/flux1-dev-random.safetensors'), False)" 2>&1 | tail -1
wait $build; tail -1 $OUT/env.txt; echo "setup $(( $(date +%s) - t0 )) s"
# the built extension, for carrying into a later call as .gpu/cache (skips the 2-minute build on a fresh machine)
[ -n "${SAVE_BUILD:-}" ] && tar -cJf $OUT/build.tar.xz -C /tmp convrot_cache 2>/dev/null
# PRE: a command run once the extension is built (e.g. a probe script), before the tests and the harness
rm -f /tmp/srv_env.sh  # a warm machine keeps /tmp: only this call's PRE may set the servers' environment
if [ -n "${PRE:-}" ]; then (eval "$PRE") > $OUT/pre.txt 2>&1; tail -30 $OUT/pre.txt; fi
# a PRE step may leave environment for the servers (e.g. the Triton GEMM variant its benchmark picked)
[ -f /tmp/srv_env.sh ] && { . /tmp/srv_env.sh; cat /tmp/srv_env.sh; }
run_tests() {
  [ "$tests" = none ] && return
  # eval: the tests argument may quote a -k expression ("tests/test_triton.py -k 'rotate or probe'")
  eval "COMFYUI_PATH=/tmp/ComfyUI timeout ${TESTS_S:-200} python3 -m pytest -q -x -p no:cacheprovider $tests" \
    > $OUT/tests.txt 2>&1
  tail -15 $OUT/tests.txt
}
[ -n "${TESTS_LAST:-}" ] || run_tests  # TESTS_LAST=1: after the harness (its rows first if time runs out)
[ "$modes" = none ] || timeout $(( ${BUDGET:-590} - ($(date +%s) - t0) )) python3 bench/server_bench.py --comfy /tmp/ComfyUI \
  --workdir $W --modes "$modes" --variants "$variants" --out $OUT/server.jsonl --log-dir /tmp/srv_logs "$@" \
  2>&1 | grep -v "^quantize \[" | tail -60
# progress bars end in \r, not \n: split them off so that log lines printed during sampling are kept
[ -n "${TESTS_LAST:-}" ] && run_tests
for f in /tmp/srv_logs/*.log; do echo "=== $f"; tr '\r' '\n' < $f | grep -v "it/s\]\|s/it\]" | tail -c 60000; done \
  > $OUT/server_logs.txt 2>/dev/null; rm -rf /tmp/srv_logs
# at most 8 files come back: a run that finished leaves its .jsonl, so its .partial.jsonl is dropped
for f in $OUT/*.partial.jsonl; do [ -f "${f%.partial.jsonl}.jsonl" ] && rm -f "$f"; done
echo "total $(( $(date +%s) - t0 )) s"
