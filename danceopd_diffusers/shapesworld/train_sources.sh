#!/usr/bin/env bash
# The ShapesWorld sources, command by command: run from the repository root, or from anywhere with the package
# installed (the trainer runs as `python -m train_danceopd`).
#
#   bash danceopd_diffusers/shapesworld/train_sources.sh data   ROOT   # VAE, untrained pipeline, data folders
#   bash danceopd_diffusers/shapesworld/train_sources.sh base   ROOT   # T2I base: full sft on data/t2i
#   bash danceopd_diffusers/shapesworld/train_sources.sh local  ROOT   # local-edit expert: LoRA sft on the base
#   bash danceopd_diffusers/shapesworld/train_sources.sh global ROOT   # global-edit expert: LoRA sft on the base
#   bash danceopd_diffusers/shapesworld/train_sources.sh joint  ROOT   # data-mixing baseline: LoRA sft on data/all
#   bash danceopd_diffusers/shapesworld/train_sources.sh edit   ROOT   # edit source: LoRA sft on data/edits (local + global)
#   bash danceopd_diffusers/shapesworld/train_sources.sh eval   ROOT   # every source on every category
#   bash danceopd_diffusers/shapesworld/train_sources.sh ship   ROOT   # fp16 copies into sources/ + results.json
#   bash danceopd_diffusers/shapesworld/train_sources.sh student ROOT  # full-length DanceOPD fusion (fusion.yaml)
#
# The shipped sources (danceopd_diffusers/shapesworld/sources) are ROOT/base, ROOT/local, ROOT/global, ROOT/joint
# and ROOT/edit in fp16; `student` trains from the shipped files, so it needs only the `data` stage (VAE=<sources>/base/vae).
#
# Every seed is 0; the environment variables below are the values the shipped sources were trained with
# (danceopd_diffusers/shapesworld/RESULTS.md says on which card and how long each stage took).
set -euo pipefail
STAGE=$1
R=$2
PY=${PYTHON:-python}
N_PER_CATEGORY=${N_PER_CATEGORY:-5000}
BASE_STEPS=${BASE_STEPS:-14000}
BASE_LR=${BASE_LR:-1e-3}
BASE_BATCH=${BASE_BATCH:-512}
BASE_INIT=${BASE_INIT:-$R/init}           # a base pipeline folder to continue from
EXPERT_STEPS=${EXPERT_STEPS:-2400}
EXPERT_RANK=${EXPERT_RANK:-32}
EXPERT_LR=${EXPERT_LR:-1e-3}
EVAL_CFG=${EVAL_CFG:-3}
STUDENT_INIT=${STUDENT_INIT:-}            # e.g. <sources>/joint_lora.safetensors: start the student there
read -r -a extra <<< "${EXTRA_ARGS:-}"    # more train_danceopd.py flags, e.g. EXTRA_ARGS="--checkpointing_steps 500"

common=(--method sft --resolution 64 --max_sequence_length 32 --gradient_accumulation_steps 1
  --caption_dropout_prob 0.1 --cache_latents --allow_tf32 --report_to none --seed 0
  --checkpointing_steps 1000000 --validation_steps 1000000 --lr_scheduler cosine
  --lr_warmup_steps 300)

expert() {  # $1 = data bucket, $2 = output folder
  $PY -m train_danceopd --pretrained_model_name_or_path "$R/base" --dataset_name "$R/data/$1/metadata.jsonl" \
    "${common[@]}" --rank "$EXPERT_RANK" --train_batch_size 256 \
    --learning_rate "$EXPERT_LR" --max_train_steps "$EXPERT_STEPS" --output_dir "$2" --skip_pipeline_export "${extra[@]}"
}

case $STAGE in
  data)
    $PY -m danceopd_diffusers.shapesworld.prepare --root "$R" --vae_steps "${VAE_STEPS:-2000}" \
      --n_per_category "$N_PER_CATEGORY" ${VAE:+--vae "$VAE"}
    ;;
  base)
    $PY -m train_danceopd --pretrained_model_name_or_path "$BASE_INIT" --dataset_name "$R/data/t2i/metadata.jsonl" \
      "${common[@]}" --full_finetune --train_batch_size "$BASE_BATCH" --learning_rate "$BASE_LR" \
      --max_train_steps "$BASE_STEPS" --output_dir "${BASE_OUT:-$R/base}" "${extra[@]}"
    ;;
  local) expert local "$R/local" ;;
  global) expert global "$R/global" ;;
  joint) expert all "$R/joint" ;;
  edit) expert edits "$R/edit" ;;
  ship)
    $PY -m danceopd_diffusers.shapesworld.ship --root "$R" --guidance_scale "$EVAL_CFG"
    ;;
  student)
    here=$(dirname "$0")
    $PY -m train_danceopd --pretrained_model_name_or_path "$here/sources/base" --fields_config "$here/fusion.yaml" \
      --dataset_name "$R/data/all/metadata.jsonl" --resolution 64 --max_sequence_length 32 --num_rollout_steps 16 \
      ${STUDENT_INIT:+--student_init "$STUDENT_INIT"} --rank 32 --train_batch_size 64 --gradient_accumulation_steps 1 --learning_rate 5e-4 \
      --max_train_steps "${STUDENT_STEPS:-1200}" --lr_scheduler constant_with_warmup --lr_warmup_steps 100 \
      --cache_latents --allow_tf32 --report_to none --seed 0 --checkpointing_steps 200 --validation_steps 1000000 \
      --output_dir "$R/student" "${extra[@]}"
    $PY -m danceopd_diffusers.shapesworld.evaluate --pipeline "$R/student" --name student --batch_size 48 \
      --json "$R/eval_student.json"
    ;;
  eval)
    for source in base local global joint edit; do
      lora=()
      [ "$source" != base ] && lora=(--lora "$R/$source")
      [ -e "$R/$source" ] || continue
      $PY -m danceopd_diffusers.shapesworld.evaluate --pipeline "$R/base" "${lora[@]}" --name "$source" \
        --guidance_scale "$EVAL_CFG" --batch_size 48 --json "$R/eval_$source.json"
    done
    ;;
  *)
    echo "unknown stage $STAGE: use data, base, local, global, joint, edit, eval, ship or student" >&2
    exit 2
    ;;
esac
