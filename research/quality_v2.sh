#!/bin/bash
# Quality v2 pipeline: after `bitflux toy train runs/toy-wide ...` finishes, make the bf16 teacher
# runs/toy-w (the asset to bundle), calibrate it and score. Each step is skipped when its output
# exists, so re-running continues (calibration resumes itself from runs/toy-w-1.58bit.partial).
cd "$(dirname "$0")/.."
B=.venv/bin/bitflux
R=runs/v2; mkdir -p $R
log() { echo "$(date -u +%H:%M:%S) $*" >> $R/driver.log; }
while pgrep -f "bitflux toy train runs/toy-wide" >/dev/null; do sleep 30; done
[ -f runs/toy-wide/model_index.json ] || { log "no trained toy"; exit 1; }
if [ ! -d runs/toy-w ]; then
  rm -rf runs/toy-w.tmp && cp -r runs/toy-wide runs/toy-w.tmp
  .venv/bin/python - <<'PY' >> $R/driver.log 2>&1 || exit 1
import shutil, torch
from diffusers import FluxTransformer2DModel
t = FluxTransformer2DModel.from_pretrained("runs/toy-wide/transformer")
shutil.rmtree("runs/toy-w.tmp/transformer")
t.to(torch.bfloat16).save_pretrained("runs/toy-w.tmp/transformer")
print("bf16 teacher written")
PY
  mv runs/toy-w.tmp runs/toy-w && log "made runs/toy-w (bf16 transformer)"
fi
step() { # name, command...
  local name=$1; shift
  [ -s $R/$name.json ] && return 0
  log "start $name"; local t0=$(date +%s)
  /usr/bin/time -v "$@" > $R/$name.json.tmp 2> $R/$name.err && mv $R/$name.json.tmp $R/$name.json
  log "end $name rc=$? $(( $(date +%s) - t0 )) s"
}
step eval-fp $B eval runs/toy-w --threads 2 --json
step calibrate $B calibrate runs/toy-w runs/toy-w-1.58bit --prompts toy --num-prompts 1024 --steps 4000 --train all --on-policy-at 0.25 --on-policy-rounds 3 --batch 32 --threads 2 --json
step eval-cal $B eval runs/toy-w-1.58bit --threads 2 --json
step eval-naive $B eval runs/toy-w --naive --threads 2 --json
step eval-cal-int8 $B eval runs/toy-w-1.58bit --activations int8 --threads 2 --json
[ -d runs/toy-w-twn ] || $B quantize runs/toy-w runs/toy-w-twn --init twn --json > $R/quantize-twn.json 2>> $R/driver.log
step eval-twn $B eval runs/toy-w-twn --threads 2 --json
step eval-cal-large $B eval runs/toy-w-1.58bit --n 192 --seeds 8 --prompt-seed 1 --threads 2 --json
log done
