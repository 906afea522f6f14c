#!/usr/bin/env bash
# One device run on the GPU box (see ../shared/gpu/README.md): trains (or resumes) the flagship
# Mario PPO run for a fixed wall-clock budget, then stops it with SIGTERM, which saves a checkpoint (a background job ignores SIGINT).
# The run directory comes back as a tarball split into <16 MiB parts under $OUT, refreshed every
# 30 s while training runs: the device tool may stop the command early (a slow machine start eats
# into the session's device time), and whatever $OUT holds then is what comes back.
#
# Usage (from the device tool, with carry [".whl", "runs/mario-1-1"] when resuming):
#   [BENCH_REPEATS=2 BENCH_SECONDS=240] bash benchmarks/gpu_train_mario.sh SECONDS [extra lab train args...]
# BENCH_REPEATS runs benchmarks/train_throughput.py on the GPU first (its time is not part of SECONDS).
set -uo pipefail
budget=${1:-420}
shift || true
[ -n "${SKIP_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --ignore-requires-python --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nproc; nvidia-smi 2>/dev/null --query-gpu=name,memory.used,memory.total --format=csv,noheader
if [ "${DEVICE:-cuda}" = cuda ]; then  # nets/layers.py:image_to_float's bf16 pixels, so far checked on the CPU only
  python3 - <<'PY' 2>&1 | tee "$OUT/bf16_pixels_check.txt"
import torch
from nets.layers import image_to_float
pixels = torch.arange(256, dtype=torch.uint8, device="cuda")
with torch.autocast("cuda", dtype=torch.bfloat16):
    fast = image_to_float(pixels)
expected = (pixels.float() / 255.0).to(torch.bfloat16)
print("bf16 pixels equal bit for bit on CUDA:", fast.dtype == torch.bfloat16 and torch.equal(fast.view(torch.int16), expected.view(torch.int16)))
PY
fi
if [ "${BENCH_REPEATS:-0}" != 0 ]; then  # the side-by-side training benchmark first (issue 6), preset sizes
  # The systems the issue's targets name (all 19 with 2 repeats would not fit BENCH_SECONDS); a
  # system whose child fails is reported and the others still run.
  systems=${BENCH_SYSTEMS:-ppo-ours,ppo-ours-overlap,ppo-ours-groups,ppo-sb3,dqn-ours-overlap,dqn-sb3,emulator}
  timeout "${BENCH_SECONDS:-300}" python3 -m benchmarks.train_throughput --device "${DEVICE:-cuda}" --envs 16 --steps 256 \
    --minibatch 512 --updates 3 --repeats "$BENCH_REPEATS" --systems "$systems" \
    --json "$OUT/train_bench.json" > "$OUT/train_bench.log" 2>&1
  tail -25 "$OUT/train_bench.log"
fi
run=runs/mario-1-1
if [ -f "$run/config.json" ]; then
  cmd=(python3 -m lab train --resume "$run" --device "${DEVICE:-cuda}" --no-progress --json "$@")
else
  cmd=(python3 -m lab train mario-1-1 --device "${DEVICE:-cuda}" --run-dir "$run" --no-progress --json "$@")
fi
echo "${cmd[@]}"
pack() {  # snapshot the run into $OUT atomically: split into a staging folder, then rename
  [ -d "$run/checkpoints" ] || return 0
  rm -rf "$OUT/.staging" && mkdir -p "$OUT/.staging"
  tar -C runs -czf - mario-1-1 | split -b 15M -d - "$OUT/.staging/mario-run.tgz.part"
  rm -f "$OUT"/mario-run.tgz.part* && mv "$OUT"/.staging/* "$OUT"/ && rmdir "$OUT/.staging"
}
start=$(date +%s)
timeout -s TERM "$budget" "${cmd[@]}" > "$OUT/train.log" 2>&1 &
train_pid=$!
while kill -0 "$train_pid" 2>/dev/null; do sleep 30; pack; done
wait "$train_pid"
echo "train exit $? after $(( $(date +%s) - start )) s"
tail -c 3000 "$OUT/train.log"
python3 - <<'PY'
from agents.engine import load_training_checkpoint
from pathlib import Path
state, _ = load_training_checkpoint(Path("runs/mario-1-1"))
for record in state["history"][-5:]:
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in record.items()})
PY
if [ "${SB3_SECONDS:-0}" != 0 ]; then
  timeout 300 python3 -m benchmarks.sb3_ppo_mario --seconds "$SB3_SECONDS" --envs 16 --device "${DEVICE:-cuda}" > "$OUT/sb3.log" 2>&1
  tail -3 "$OUT/sb3.log"
fi
pack
ls -la "$OUT"
