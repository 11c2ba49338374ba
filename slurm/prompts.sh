# shellcheck shell=bash
# The pipeline's start from prompts (INFIFPO_PROMPTS), sourced by slurm/common.sh:
#
#   generate  slurm/generate.sbatch  array over models x shards (generate.tsv: pivot first)
#   judge     slurm/judge.sbatch     array over shards of the prompts (the judge: judge.tsv)
#   pairs     slurm/pairs.sbatch     -> pairs/sft.jsonl (SFT part) and pairs/pairs.jsonl
#   sft       slurm/train.sbatch     on INFIFPO_OUT/sft: the pivot trained on sft.jsonl
#   sft_export slurm/export.sbatch   on INFIFPO_OUT/sft -> INFIFPO_OUT/sft/hf, the initial pivot p0
#
# after which the usual stages run on pairs/pairs.jsonl with p0 as the pivot (models.tsv's
# pivot path is INFIFPO_OUT/sft/hf). The SFT stage is the pipeline's own train and export
# stages run with INFIFPO_OUT=INFIFPO_OUT/sft (its markers live in INFIFPO_OUT/sft/status), the
# SFT config (INFIFPO_SFT_CONFIG) and overrides, and the original pivot.
#
# State on disk, under $INFIFPO_OUT: generate.tsv, judge.tsv, generate/<model>/ (recipes/
# generate.py outputs), judge/ (recipes/judge.py), pairs/ (recipes/build_pairs.py: sft.jsonl,
# pairs.jsonl, report.json), sft/ (models.tsv, train/, hf/, status/).

infifpo_prompts_mode() { [ -n "${INFIFPO_PROMPTS:-}" ]; }

# Defaults and derived paths of the prompts start; called by infifpo_load_settings before it
# exports every INFIFPO_* setting.
infifpo_load_prompt_settings() {
  : "${INFIFPO_PROMPTS:=}"
  : "${INFIFPO_JUDGE:=}"
  : "${INFIFPO_GENERATE_SHARDS:=1}"
  : "${INFIFPO_GENERATE_PARALLEL:=}"
  : "${INFIFPO_GENERATE_BACKEND:=}"
  : "${INFIFPO_GENERATE_OVERRIDES:=}"
  : "${INFIFPO_GENERATE_TIME:=08:00:00}"
  : "${INFIFPO_GENERATE_SBATCH_ARGS:=}"
  : "${INFIFPO_JUDGE_SHARDS:=1}"
  : "${INFIFPO_JUDGE_TASKS:=1}"
  : "${INFIFPO_JUDGE_OVERRIDES:=}"
  : "${INFIFPO_JUDGE_TIME:=04:00:00}"
  : "${INFIFPO_JUDGE_SBATCH_ARGS:=}"
  : "${INFIFPO_PAIRS_OVERRIDES:=}"
  : "${INFIFPO_PAIRS_TIME:=01:00:00}"
  : "${INFIFPO_PAIRS_SBATCH_ARGS:=}"
  : "${INFIFPO_SFT_CONFIG:=sft_phi4}"
  : "${INFIFPO_SFT_OVERRIDES:=}"
  : "${INFIFPO_SFT_TP:=}"
  : "${INFIFPO_SFT_PP:=}"
  : "${INFIFPO_SFT_NODES:=${INFIFPO_NODES}}"
  : "${INFIFPO_SFT_TIME:=${INFIFPO_TRAIN_TIME}}"
  : "${INFIFPO_SFT_SBATCH_ARGS:=}"
  : "${INFIFPO_SFT_EXPORT_SBATCH_ARGS:=}"
  # vLLM pins its own torch build: generation (and the judge) may live in another environment
  # or container than the other stages; "none" = no container.
  : "${INFIFPO_GENERATE_PYTHON:=${INFIFPO_PYTHON}}"
  : "${INFIFPO_GENERATE_CONTAINER_IMAGE:=${INFIFPO_CONTAINER_IMAGE:-none}}"
  : "${INFIFPO_GENERATE_CONTAINER_MOUNTS:=${INFIFPO_CONTAINER_MOUNTS:-none}}"
  : "${INFIFPO_JUDGE_PYTHON:=${INFIFPO_PYTHON}}"
  : "${INFIFPO_JUDGE_CONTAINER_IMAGE:=${INFIFPO_CONTAINER_IMAGE:-none}}"
  : "${INFIFPO_JUDGE_CONTAINER_MOUNTS:=${INFIFPO_CONTAINER_MOUNTS:-none}}"
  if [ -z "${INFIFPO_GENERATE_DTYPE:-}" ]; then
    if [ "$INFIFPO_GPUS_PER_NODE" -gt 0 ] 2>/dev/null; then INFIFPO_GENERATE_DTYPE=bfloat16; else INFIFPO_GENERATE_DTYPE=float32; fi
  fi
  if [ -z "${INFIFPO_JUDGE_GPUS:-}" ]; then
    # One node's GPUs, the answers shared among them (data parallel).
    INFIFPO_JUDGE_GPUS="$INFIFPO_GPUS_PER_NODE"
  fi
  local name
  for name in INFIFPO_GENERATE_SHARDS INFIFPO_JUDGE_SHARDS INFIFPO_JUDGE_TASKS INFIFPO_JUDGE_GPUS INFIFPO_SFT_NODES; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || infifpo_die "${name} must be a non-negative integer, got '${!name}'"
  done
  for name in INFIFPO_GENERATE_SHARDS INFIFPO_JUDGE_SHARDS INFIFPO_SFT_NODES; do
    [ "${!name}" -ge 1 ] || infifpo_die "${name} must be >= 1"
  done
  for name in INFIFPO_GENERATE_PARALLEL INFIFPO_SFT_TP INFIFPO_SFT_PP; do
    [ -z "${!name}" ] || [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || infifpo_die "${name} must be a positive integer, got '${!name}'"
  done
  [ -z "$INFIFPO_GENERATE_BACKEND" ] || [[ "$INFIFPO_GENERATE_BACKEND" =~ ^(hf|vllm)$ ]] ||
    infifpo_die "INFIFPO_GENERATE_BACKEND must be hf or vllm, got '${INFIFPO_GENERATE_BACKEND}'"

  # Used by the scripts that source this file.
  # shellcheck disable=SC2034
  INFIFPO_GENERATE_TSV="${INFIFPO_OUT}/generate.tsv"
  INFIFPO_JUDGE_TSV="${INFIFPO_OUT}/judge.tsv"
  INFIFPO_GENERATE_DIR="${INFIFPO_OUT}/generate"
  # shellcheck disable=SC2034
  INFIFPO_JUDGE_DIR="${INFIFPO_OUT}/judge"
  INFIFPO_PAIRS_DIR="${INFIFPO_OUT}/pairs"
  INFIFPO_SFT_OUT="${INFIFPO_OUT}/sft"
  INFIFPO_SFT_EXPORT_DIR="${INFIFPO_SFT_OUT}/hf"
  infifpo_prompts_mode || return 0
  INFIFPO_PROMPTS="$(infifpo_abspath "$INFIFPO_PROMPTS")"
  # The later stages read the preference part that build_pairs writes.
  local derived="${INFIFPO_PAIRS_DIR}/pairs.jsonl"
  if [ -n "$INFIFPO_DATA" ] && [ "$(infifpo_abspath "$INFIFPO_DATA")" != "$derived" ]; then
    infifpo_die "INFIFPO_PROMPTS and INFIFPO_DATA are alternatives (start from prompts, or from preference pairs); set one"
  fi
  INFIFPO_DATA="$derived"
  INFIFPO_SFT_DATA="${INFIFPO_PAIRS_DIR}/sft.jsonl"
}

# generate.tsv and judge.tsv from INFIFPO_PIVOT / INFIFPO_SOURCES / INFIFPO_JUDGE
# (slurm/generation_list.py), and the pivot of models.tsv replaced by the SFT model.
infifpo_write_prompt_lists() {
  local tmp="${INFIFPO_GENERATE_TSV}.tmp.$$" py=("$INFIFPO_PYTHON")
  if ! "${py[@]}" "${INFIFPO_REPO}/slurm/generation_list.py" --pivot "$INFIFPO_PIVOT" --sources "$INFIFPO_SOURCES" \
    --models-dir "$INFIFPO_MODELS_DIR" --backend "$INFIFPO_GENERATE_BACKEND" >"$tmp"; then
    rm -f "$tmp"
    infifpo_die "could not build the generation list from INFIFPO_PIVOT='${INFIFPO_PIVOT}' INFIFPO_SOURCES='${INFIFPO_SOURCES}'"
  fi
  mv -f "$tmp" "$INFIFPO_GENERATE_TSV"
  tmp="${INFIFPO_JUDGE_TSV}.tmp.$$"
  if ! "${py[@]}" "${INFIFPO_REPO}/slurm/generation_list.py" --sources "$INFIFPO_SOURCES" \
    --models-dir "$INFIFPO_MODELS_DIR" --judge "$INFIFPO_JUDGE" >"$tmp"; then
    rm -f "$tmp"
    infifpo_die "no judge: set INFIFPO_JUDGE, or a 'judge' mapping in ${INFIFPO_SOURCES}"
  fi
  mv -f "$tmp" "$INFIFPO_JUDGE_TSV"
  # p0, the pivot every later stage scores and trains, is the SFT model.
  tmp="${INFIFPO_MODELS_TSV}.tmp.$$"
  awk -F '\t' -v OFS='\t' -v p0="$INFIFPO_SFT_EXPORT_DIR" '$1 == "0" { $3 = p0 } { print }' "$INFIFPO_MODELS_TSV" >"$tmp"
  mv -f "$tmp" "$INFIFPO_MODELS_TSV"
}

# In the prompts start the evaluation compares the pivot as given ("pivot"), the SFT model p0
# ("sft") and the fused model, unless INFIFPO_EVAL_INITIAL_PIVOT says otherwise.
infifpo_prompt_eval_default() {
  infifpo_prompts_mode || return 0
  [ -n "$INFIFPO_EVAL_INITIAL_PIVOT" ] || INFIFPO_EVAL_INITIAL_PIVOT="$(infifpo_initial_pivot)"
  export INFIFPO_EVAL_INITIAL_PIVOT
}

# The pivot as given (before SFT): generation and SFT start from it; evaluated as "pivot".
infifpo_initial_pivot() {
  grep -v '^#' "$INFIFPO_GENERATE_TSV" | awk -F '\t' '$1 == "0" { print $3 }'
}

infifpo_generate_count() { grep -vc '^#' "$INFIFPO_GENERATE_TSV"; }

# Reads generation model <index> into GEN_NAME GEN_PATH GEN_BACKEND GEN_TP GEN_SAMPLES
# GEN_TEMPERATURE GEN_TOP_P GEN_MAX_NEW GEN_SEED GEN_OVERRIDES.
infifpo_read_generation_model() {
  local want="$1" index name path backend tp samples temperature top_p max_new seed overrides
  while IFS=$'\t' read -r index name path backend tp samples temperature top_p max_new seed overrides; do
    [[ "$index" == \#* ]] && continue
    if [ "$index" = "$want" ]; then
      # shellcheck disable=SC2034  # read by the callers
      GEN_NAME="$name" GEN_PATH="$path" GEN_BACKEND="$backend" GEN_TP="$tp" GEN_SAMPLES="$samples" \
        GEN_TEMPERATURE="$temperature" GEN_TOP_P="$top_p" GEN_MAX_NEW="$max_new" GEN_SEED="$seed" GEN_OVERRIDES="$overrides"
      return 0
    fi
  done <"$INFIFPO_GENERATE_TSV"
  infifpo_die "model ${want} not in ${INFIFPO_GENERATE_TSV}"
}

# GPUs of one generation task: the largest tensor-parallel size of the list (vLLM); none on CPU.
infifpo_generate_gpus() {
  if infifpo_cpu_mode; then printf '0\n'; return 0; fi
  grep -v '^#' "$INFIFPO_GENERATE_TSV" | cut -f 5 | sort -n | tail -n 1
}

infifpo_generation_dirs() {
  grep -v '^#' "$INFIFPO_GENERATE_TSV" | cut -f 2 | while read -r name; do printf '%s/%s\n' "$INFIFPO_GENERATE_DIR" "$name"; done
}

# Unit keys of the prompts start (see infifpo_unit_key).
infifpo_prompt_unit_key() {
  local unit="$1"
  case "$unit" in
    generate.*)
      local task="${unit#generate.}"
      infifpo_read_generation_model $((task / INFIFPO_GENERATE_SHARDS))
      printf 'generate prompts=%s model=%s path=%s backend=%s tp=%s n=%s t=%s top_p=%s max_new=%s seed=%s shard=%s/%s dtype=%s overrides=%s %s\n' \
        "$INFIFPO_PROMPTS" "$GEN_NAME" "$GEN_PATH" "$GEN_BACKEND" "$GEN_TP" "$GEN_SAMPLES" "$GEN_TEMPERATURE" "$GEN_TOP_P" \
        "$GEN_MAX_NEW" "$GEN_SEED" $((task % INFIFPO_GENERATE_SHARDS)) "$INFIFPO_GENERATE_SHARDS" "$INFIFPO_GENERATE_DTYPE" \
        "$GEN_OVERRIDES" "$INFIFPO_GENERATE_OVERRIDES"
      ;;
    judge.*)
      printf 'judge prompts=%s models=%s judge=%s shard=%s/%s overrides=%s\n' "$INFIFPO_PROMPTS" \
        "$(grep -v '^#' "$INFIFPO_GENERATE_TSV" | cut -f 2 | paste -sd ,)" "$(tr '\t' ' ' <"$INFIFPO_JUDGE_TSV")" \
        "${unit#judge.}" "$INFIFPO_JUDGE_SHARDS" "$INFIFPO_JUDGE_OVERRIDES"
      ;;
    pairs)
      printf 'pairs prompts=%s models=%s judge=%s overrides=%s\n' "$INFIFPO_PROMPTS" \
        "$(grep -v '^#' "$INFIFPO_GENERATE_TSV" | cut -f 2 | paste -sd ,)" "$(tr '\t' ' ' <"$INFIFPO_JUDGE_TSV")" \
        "$INFIFPO_PAIRS_OVERRIDES"
      ;;
    *) return 1 ;;
  esac
}

# Runs "$@" in a subshell with the SFT stage's settings: the pipeline's train and export
# stages on INFIFPO_OUT/sft, with the SFT config and the original pivot.
infifpo_with_sft_settings() {
  (
    INFIFPO_OUT="$INFIFPO_SFT_OUT" INFIFPO_TRAIN_DATA="$INFIFPO_SFT_DATA" INFIFPO_DATA="$INFIFPO_SFT_DATA" \
      INFIFPO_PROMPTS="" INFIFPO_CONFIG="$INFIFPO_SFT_CONFIG" INFIFPO_OVERRIDES="$INFIFPO_SFT_OVERRIDES" \
      INFIFPO_TP="$INFIFPO_SFT_TP" INFIFPO_PP="$INFIFPO_SFT_PP" INFIFPO_NODES="$INFIFPO_SFT_NODES" \
      INFIFPO_EXPORT_CHECKPOINT="" INFIFPO_EVAL=0 infifpo_run_with_settings "$@"
  )
}

infifpo_run_with_settings() {
  infifpo_load_settings
  "$@"
}

# The "stages" entries of pipeline.json for the prompts start (each line ends with a comma).
infifpo_prompt_stages_json() {
  infifpo_prompts_mode || return 0
  [ -f "$INFIFPO_GENERATE_TSV" ] || return 0
  local stage count i first states
  for stage in generate judge; do
    if [ "$stage" = generate ]; then count=$(($(infifpo_generate_count) * INFIFPO_GENERATE_SHARDS)); else count=$INFIFPO_JUDGE_SHARDS; fi
    printf '\n    "%s": {"tasks": {' "$stage"
    first=1 states=()
    for ((i = 0; i < count; i++)); do
      infifpo_unit_info "${stage}.${i}"
      [ "$first" -eq 1 ] || printf ','
      first=0
      printf '\n      %s: %s' "$(infifpo_json_str "$i")" "$(infifpo_unit_json_from_info)"
      states+=("$UNIT_STATE")
    done
    printf '\n    }, "state": %s},' "$(infifpo_json_str "$(infifpo_aggregate_state "${states[@]}")")"
  done
  infifpo_unit_info pairs
  printf '\n    "pairs": %s,' "$(infifpo_unit_json_from_info)"
  printf '\n    "sft": %s,' "$(infifpo_with_sft_settings infifpo_unit_info_json train)"
  printf '\n    "sft_export": %s,' "$(infifpo_with_sft_settings infifpo_unit_info_json export)"
}

infifpo_unit_info_json() {
  if [ -f "$INFIFPO_MODELS_TSV" ]; then
    infifpo_unit_info "$1"
  else
    # shellcheck disable=SC2034  # read by infifpo_unit_json_from_info
    UNIT_JOB="" UNIT_STATE=missing UNIT_SLURM=""
  fi
  infifpo_unit_json_from_info
}
