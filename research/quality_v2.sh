#!/bin/bash
# Quality v2 pipeline: after `bitflux toy train $SRC ...` finishes, make the bf16 teacher $T (the
# asset to bundle), calibrate it and score. Each step is skipped when its output exists, so
# re-running continues (calibration resumes itself from $T-1.58bit.partial).
#   SRC=runs/toy-wide2 T=runs/toy-w2 R=runs/v2b bash research/quality_v2.sh
cd "$(dirname "$0")/.."
B=.venv/bin/bitflux
SRC=${SRC:-runs/toy-wide}; T=${T:-runs/toy-w}
R=${R:-runs/v2}; mkdir -p $R
log() { echo "$(date -u +%H:%M:%S) $*" >> $R/driver.log; }
while pgrep -f "bitflux toy train $SRC" >/dev/null; do sleep 30; done
[ -f $SRC/model_index.json ] || { log "no trained toy"; exit 1; }
if [ ! -d $T ]; then
  rm -rf $T.tmp && cp -r $SRC $T.tmp
  SRC=$SRC T=$T .venv/bin/python - <<'PY' >> $R/driver.log 2>&1 || exit 1
import os, shutil, torch
from diffusers import FluxTransformer2DModel
src, t = os.environ["SRC"], os.environ["T"]
m = FluxTransformer2DModel.from_pretrained(f"{src}/transformer")
shutil.rmtree(f"{t}.tmp/transformer")
m.to(torch.bfloat16).save_pretrained(f"{t}.tmp/transformer")
print("bf16 teacher written")
PY
  mv $T.tmp $T && log "made $T (bf16 transformer)"
fi
step() { # name, command...
  local name=$1; shift
  [ -s $R/$name.json ] && return 0
  log "start $name"; local t0=$(date +%s)
  /usr/bin/time -v "$@" > $R/$name.json.tmp 2> $R/$name.err && mv $R/$name.json.tmp $R/$name.json
  log "end $name rc=$? $(( $(date +%s) - t0 )) s"
}
step eval-fp $B eval $T --threads 2 --json
step calibrate $B calibrate $T $T-1.58bit --prompts toy --num-prompts 1024 --steps 4000 --train all --on-policy-at 0.25 --on-policy-rounds 3 --batch 32 --threads 2 --json
step eval-cal $B eval $T-1.58bit --threads 2 --json
step eval-naive $B eval $T --naive --threads 2 --json
step eval-cal-int8 $B eval $T-1.58bit --activations int8 --threads 2 --json
[ -d $T-twn ] || $B quantize $T $T-twn --init twn --json > $R/quantize-twn.json 2>> $R/driver.log
step eval-twn $B eval $T-twn --threads 2 --json
step eval-cal-large $B eval $T-1.58bit --n 192 --seeds 8 --prompt-seed 1 --threads 2 --json
log done
