#!/bin/bash
# One device call: install carried wheels, build the extension, run the GPU tests, then the bench.
# Usage on the device: bash bench/gpu_run.sh [tests|bench|all|sanitize]   (logs under $OUT)
set -o pipefail
what=${1:-all}
export PYTHONUNBUFFERED=1 MAX_JOBS=16 CONVROT_CACHE_DIR=/tmp/convrot-cache
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee $OUT/env.txt
python3 -c "import torch;print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a $OUT/env.txt
t0=$(date +%s)
python3 -c "
import logging, time; logging.basicConfig(level=logging.INFO)
t=time.time(); from convrot import kernels; print('load ->', kernels.load(verbose=False), kernels.unavailable_reason(), f'{time.time()-t:.0f} s')
" 2>&1 | tee $OUT/build.txt
echo "build+load took $(( $(date +%s) - t0 )) s" | tee -a $OUT/build.txt
cp /tmp/convrot-cache/*/*.so $OUT/ 2>/dev/null
if [ $what = tests ] || [ $what = all ]; then
  timeout 400 python3 -m pytest -q -x tests/test_kernels_gpu.py -p no:cacheprovider 2>&1 | tee $OUT/tests.txt | tail -30
fi
if [ $what = bench ] || [ $what = all ]; then
  python3 -c "import sys; from convrot.bench import main; sys.exit(main(sys.argv[1:]))" $BENCH_ARGS --json $OUT/bench.json 2>&1 | tee $OUT/bench.txt
fi
if [ $what = ncu ]; then
  # 4608x3072 then 4608x15360: int8 and packed variants, third call of each
  timeout 200 ncu --clock-control none -k regex:rotate_quantize_kernel --launch-skip 4 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section MemoryWorkloadAnalysis \
    python3 bench/ncu_act.py > $OUT/ncu.txt 2>&1
  timeout 200 ncu --clock-control none -k regex:rotate_quantize_kernel --launch-skip 10 --launch-count 2 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats \
    python3 bench/ncu_act.py > $OUT/ncu_k15360.txt 2>&1
fi
if [ $what = sanitize ]; then
  timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x tests/test_kernels_gpu.py -p no:cacheprovider \
    -k "not compile and not 15360 and not 20480" 2>&1 | tee $OUT/sanitize.txt | tail -30
fi
