#!/usr/bin/env bash
# One device call of the ShapesWorld study, second edition (the paper's query regime: --query_space sigma).
#
#   bash danceopd_diffusers/shapesworld/study_gpu_call.sh DEADLINE_S [RUN_PATTERN ...]
#
# Idempotent and resumable: call it again (on the same warm machine, or a fresh one) and it continues. It
# installs the carried wheels (.whl/: diffusers and peft, which the GPU image lacks), prepares the data if the root
# has none, trains the selected runs until about DEADLINE_S seconds after its start less the time kept for
# scoring (runs still going get SIGTERM, checkpoint, and resume next call), scores what finished on the large
# set, and packs the evaluations and fp16 copies of the finished students into $OUT (at most 8 files of 16 MiB).
# ROOT (default /tmp/sw2) is the study root; EVAL_S (default 150) the seconds kept for scoring.
set -uo pipefail
DEADLINE=${1:?usage: study_gpu_call.sh DEADLINE_S [RUN_PATTERN ...]}
shift
PATTERNS=("$@")
START=$(date +%s)
ROOT=${ROOT:-/tmp/sw2}
EVAL_S=${EVAL_S:-150}
OUT=${OUT:-$ROOT/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] && ! python3 -c "import diffusers, peft" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-}
S="python3 -m danceopd_diffusers.shapesworld.study"
if [ ! -f "$ROOT/data/all/metadata.jsonl" ]; then
  python3 -m danceopd_diffusers.shapesworld.prepare --root "$ROOT" --n_per_category 5000 \
    --vae danceopd_diffusers/shapesworld/sources/base/vae --buckets t2i local global all 2>&1 | tail -4
fi
echo "[call] data ready after $(($(date +%s) - START)) s"
left() { echo $((DEADLINE - ($(date +%s) - START))); }
MAIN=() SEEDS=()
for p in "${PATTERNS[@]}"; do
  case $p in *seed*) SEEDS+=("$p") ;; *) MAIN+=("$p") ;; esac
done
TRAIN_S=$(($(left) - EVAL_S))
if [ "$TRAIN_S" -gt 60 ] && [ ${#PATTERNS[@]} -gt 0 ]; then
  # main, ablation and seed runs share one queue of --jobs at once: `train` for the first two, then `seeds`
  # (whose best-baseline choice reads the shipped results.json) with what is left of the budget
  $S train --root "$ROOT" --query_space sigma --jobs "${JOBS:-12}" --budget_s "$TRAIN_S" --only "${MAIN[@]:-none}" &
  T1=$!
  if [ ${#SEEDS[@]} -gt 0 ]; then
    $S seeds --root "$ROOT" --query_space sigma --dest "${DEST:-danceopd_diffusers/shapesworld/study2}" --jobs "${SEED_JOBS:-4}" --budget_s "$TRAIN_S" --only "${SEEDS[@]}" &
  fi
  wait
fi
echo "[call] training ended after $(($(date +%s) - START)) s"
EVAL_LEFT=$(($(left) - 25))
if [ "$EVAL_LEFT" -gt 20 ]; then
  $S eval --root "$ROOT" --budget_s "$EVAL_LEFT" --only "${PATTERNS[@]}" 2>&1 | tail -20
fi
# pack: evaluations, settings, launch records and loss logs; fp16 copies of the finished students (2 tars)
python3 - "$ROOT" "$OUT" <<'EOF'
import json, sys, tarfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

root, out = Path(sys.argv[1]), Path(sys.argv[2])
with tarfile.open(out / "evals.tgz", "w:gz") as tar:
    for path in [root / "study.json", *root.glob("evals/**/*.json"), *root.glob("runs/*/logs/routes_rank0.jsonl"),
                 *root.glob("runs/*/danceopd_config.json"), *root.glob("runs/*/launches.json")]:
        if path.is_file():
            tar.add(path, arcname=str(path.relative_to(root)))
finished = sorted(p for p in root.glob("runs/*/pytorch_lora_weights.safetensors"))
half = (len(finished) + 1) // 2
for i, chunk in enumerate((finished[:half], finished[half:])):
    with tarfile.open(out / f"students{i}.tar", "w") as tar:
        for path in chunk:
            fp16 = path.with_name("student_fp16.safetensors")
            with safe_open(path, "pt") as f:  # the LoRA's metadata (rank, alpha) travels with it
                metadata = f.metadata()
            save_file({k: v.to(torch.float16) for k, v in load_file(path).items()}, fp16, metadata=metadata)
            tar.add(fp16, arcname=f"{path.parent.name}.safetensors")
state = {p.parent.name: p.name for p in sorted(root.glob("runs/*/checkpoint-*/"))}
print("[call] finished:", [p.parent.name for p in finished])
print("[call] latest checkpoints:", json.dumps(state))
EOF
echo "[call] done after $(($(date +%s) - START)) s"
