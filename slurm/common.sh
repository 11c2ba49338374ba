# shellcheck shell=bash
# Shared helpers for slurm/train_phi4.sh and the per-stage slurm/*.sbatch files. Sourced, not
# run. Callers set INFIFPO_REPO first (see infifpo_locate_repo in each script: under sbatch
# the script itself runs from a spool copy, so $0 says nothing about where the repo is).
#
# State on disk, under $INFIFPO_OUT (the only place the pipeline writes):
#   models.tsv            the scoring array: task index -> model name, path, backend, TP, PP,
#                         extra score.py overrides
#   scores/<name>/        recipes/score.py output for each model (task 0 = pivot)
#   merge/train.scored.parquet   recipes/merge_scores.py output
#   train/                recipes/train_infifpo.py output_dir (checkpoints/, metrics.jsonl)
#   hf/                   recipes/export_hf.py output: the trained pivot as an HF checkpoint
#   eval/                 recipes/evaluate.py output: <model>/results.json, summary.md/.json
#   logs/                 Slurm stdout/stderr of every job
#   status/<unit>.{job,started,complete,failed}   per unit (score.<i>, merge, train, export, eval):
#                         job id; start; success (first line: the inputs it was computed from);
#                         failure. A unit is complete iff its .complete names the same inputs.
#   pipeline.json         a view of all of the above, rewritten atomically after every change

# ------------------------------------------------------------------ logging

infifpo_log() {
  printf '[infifpo %s%s] %s\n' "$(date '+%F %T')" "${INFIFPO_UNIT:+ ${INFIFPO_UNIT}}" "$*" >&2
}

infifpo_die() {
  infifpo_log "error: $*"
  exit 1
}

# ------------------------------------------------------------------ settings

# Absolute path without requiring it to exist (realpath -m), so settings stay valid when
# jobs run from another working directory.
infifpo_abspath() {
  realpath -m -- "$1"
}

# Split a settings string into words, honouring shell-style quotes ("a b" / 'a b'), without
# eval: xargs does the quote handling. Result in the array named by $1.
# (Locals of functions that fill a caller's array by name start with "_": a local with the
# caller's name would shadow it.)
infifpo_split_words() {
  local -n _out="$1"
  local _text
  _out=()
  [ -n "${2//[[:space:]]/}" ] || return 0
  _text="$(xargs -n 1 printf '%s\n' <<<"$2")" || infifpo_die "cannot split into words (unmatched quote?): $2"
  mapfile -t _out <<<"$_text"
}

# A value as a quoted Hydra string, so paths with '=', ',', spaces or brackets survive
# override parsing: quotes become \', and backslashes are doubled only where Hydra reads them
# as escapes (right before a quote or at the end); elsewhere Hydra keeps them as they are.
infifpo_hydra_str() {
  local s="$1" out="" run="" c i
  for ((i = 0; i < ${#s}; i++)); do
    c="${s:i:1}"
    if [ "$c" = "\\" ]; then
      run+="$c"
      continue
    fi
    if [ "$c" = "'" ]; then out+="${run}${run}\\'"; else out+="${run}${c}"; fi
    run=""
  done
  printf "'%s'" "${out}${run}${run}"
}

# key='value' for a Hydra override.
infifpo_hydra_kv() {
  printf '%s=%s' "$1" "$(infifpo_hydra_str "$2")"
}

# [ 'a', 'b' ] for a Hydra list override.
infifpo_hydra_list() {
  local out="" item
  for item in "$@"; do
    out+="${out:+,}$(infifpo_hydra_str "$item")"
  done
  printf '[%s]' "$out"
}

# Defaults for every setting (documented in slurm/train_phi4.sh), derived paths, and
# validation of the numbers. Safe to call more than once.
infifpo_load_settings() {
  : "${INFIFPO_REPO:?INFIFPO_REPO must be set before infifpo_load_settings}"
  INFIFPO_REPO="$(infifpo_abspath "$INFIFPO_REPO")"
  : "${INFIFPO_CONFIG:=infifpo_phi4}"
  : "${INFIFPO_CONFIG_DIR:=}"
  : "${INFIFPO_PYTHON:=python}"
  : "${INFIFPO_OUT:=${INFIFPO_REPO}/outputs/${INFIFPO_CONFIG}}"
  : "${INFIFPO_DATA:=}"
  : "${INFIFPO_PIVOT:=}"
  : "${INFIFPO_SOURCES:=${INFIFPO_REPO}/configs/sources/phi4_paper.yaml}"
  : "${INFIFPO_MODELS_DIR:=}"
  : "${INFIFPO_NODES:=2}"
  : "${INFIFPO_GPUS_PER_NODE:=8}"
  : "${INFIFPO_TASKS_PER_NODE:=2}"
  : "${INFIFPO_CPUS_PER_TASK:=}"
  : "${INFIFPO_TP:=}"
  : "${INFIFPO_PP:=}"
  : "${INFIFPO_OVERRIDES:=}"
  : "${INFIFPO_CONTAINER_IMAGE:=}"
  : "${INFIFPO_CONTAINER_MOUNTS:=}"
  : "${INFIFPO_ACCOUNT:=}"
  : "${INFIFPO_PARTITION:=}"
  : "${INFIFPO_SBATCH_ARGS:=}"
  : "${INFIFPO_SCORE_SBATCH_ARGS:=}"
  : "${INFIFPO_MERGE_SBATCH_ARGS:=}"
  : "${INFIFPO_TRAIN_SBATCH_ARGS:=}"
  : "${INFIFPO_EXPORT_SBATCH_ARGS:=}"
  : "${INFIFPO_SCORE_GPUS:=${INFIFPO_GPUS_PER_NODE}}"
  : "${INFIFPO_SCORE_TASKS:=1}"
  : "${INFIFPO_SCORE_SHARDS:=1}"
  : "${INFIFPO_SCORE_PARALLEL:=}"
  : "${INFIFPO_SCORE_OVERRIDES:=}"
  : "${INFIFPO_MERGE_OVERRIDES:=}"
  : "${INFIFPO_EXPORT_OVERRIDES:=}"
  : "${INFIFPO_EXPORT_CHECKPOINT:=}"
  : "${INFIFPO_SCORE_TIME:=04:00:00}"
  : "${INFIFPO_MERGE_TIME:=01:00:00}"
  : "${INFIFPO_TRAIN_TIME:=04:00:00}"
  : "${INFIFPO_EXPORT_TIME:=01:00:00}"
  : "${INFIFPO_SIGNAL_SECONDS:=300}"
  : "${INFIFPO_DRY_RUN:=0}"
  # The evaluation stage (slurm/evaluate.sbatch). Its interpreter and container default to the
  # other stages' but are separate settings: vLLM usually lives in its own environment.
  : "${INFIFPO_EVAL:=1}"
  : "${INFIFPO_EVAL_INITIAL_PIVOT:=}"
  : "${INFIFPO_EVAL_SOURCES:=0}"
  : "${INFIFPO_EVAL_ALLOW_CODE:=0}"
  if [ "$INFIFPO_EVAL_ALLOW_CODE" = 1 ]; then
    : "${INFIFPO_EVAL_BENCHMARKS:=infifpo_paper}"
  else
    : "${INFIFPO_EVAL_BENCHMARKS:=infifpo_paper_no_code}"
  fi
  : "${INFIFPO_EVAL_TASKS:=}"
  : "${INFIFPO_EVAL_INCLUDE_PATH:=}"
  : "${INFIFPO_EVAL_LIMIT:=}"
  : "${INFIFPO_EVAL_OVERRIDES:=}"
  : "${INFIFPO_EVAL_TIME:=08:00:00}"
  : "${INFIFPO_EVAL_SBATCH_ARGS:=}"
  : "${INFIFPO_EVAL_PYTHON:=${INFIFPO_PYTHON}}"
  : "${INFIFPO_EVAL_CONTAINER_IMAGE:=${INFIFPO_CONTAINER_IMAGE:-none}}"
  : "${INFIFPO_EVAL_CONTAINER_MOUNTS:=${INFIFPO_CONTAINER_MOUNTS:-none}}"
  if [ -z "${INFIFPO_EVAL_BACKEND:-}" ]; then
    # vLLM on GPU nodes; lm-eval's transformers back end on CPU.
    if [ "$INFIFPO_GPUS_PER_NODE" -gt 0 ] 2>/dev/null; then INFIFPO_EVAL_BACKEND=vllm; else INFIFPO_EVAL_BACKEND=hf; fi
  fi
  if [ -z "${INFIFPO_EVAL_GPUS:-}" ]; then
    if [ "$INFIFPO_GPUS_PER_NODE" -gt 0 ] 2>/dev/null; then INFIFPO_EVAL_GPUS=1; else INFIFPO_EVAL_GPUS=0; fi
  fi
  if [ -z "${INFIFPO_SCORE_DTYPE:-}" ]; then
    # bf16 on GPUs; float32 on CPU, where bf16 matmuls are slow and scores should be exact.
    if [ "$INFIFPO_GPUS_PER_NODE" -gt 0 ] 2>/dev/null; then INFIFPO_SCORE_DTYPE=bfloat16; else INFIFPO_SCORE_DTYPE=float32; fi
  fi

  local name
  for name in INFIFPO_NODES INFIFPO_GPUS_PER_NODE INFIFPO_TASKS_PER_NODE INFIFPO_SCORE_GPUS \
    INFIFPO_SCORE_TASKS INFIFPO_SCORE_SHARDS INFIFPO_SIGNAL_SECONDS INFIFPO_EVAL_GPUS; do
    [[ "${!name}" =~ ^[0-9]+$ ]] || infifpo_die "${name} must be a non-negative integer, got '${!name}'"
  done
  [ "$INFIFPO_NODES" -ge 1 ] || infifpo_die "INFIFPO_NODES must be >= 1"
  [ "$INFIFPO_SCORE_SHARDS" -ge 1 ] || infifpo_die "INFIFPO_SCORE_SHARDS must be >= 1"
  for name in INFIFPO_EVAL INFIFPO_EVAL_SOURCES INFIFPO_EVAL_ALLOW_CODE; do
    [[ "${!name}" =~ ^[01]$ ]] || infifpo_die "${name} must be 0 or 1, got '${!name}'"
  done
  [[ "$INFIFPO_EVAL_BACKEND" =~ ^(hf|vllm)$ ]] || infifpo_die "INFIFPO_EVAL_BACKEND must be hf or vllm, got '${INFIFPO_EVAL_BACKEND}'"
  local n
  for n in INFIFPO_TP INFIFPO_PP INFIFPO_CPUS_PER_TASK INFIFPO_SCORE_PARALLEL INFIFPO_EVAL_LIMIT; do
    [ -z "${!n}" ] || [[ "${!n}" =~ ^[1-9][0-9]*$ ]] || infifpo_die "${n} must be a positive integer, got '${!n}'"
  done

  INFIFPO_OUT="$(infifpo_abspath "$INFIFPO_OUT")"
  [ -z "$INFIFPO_DATA" ] || INFIFPO_DATA="$(infifpo_abspath "$INFIFPO_DATA")"
  [ -z "$INFIFPO_CONFIG_DIR" ] || INFIFPO_CONFIG_DIR="$(infifpo_abspath "$INFIFPO_CONFIG_DIR")"
  if [[ "$INFIFPO_SOURCES" == *.yaml || "$INFIFPO_SOURCES" == *.yml ]] && [[ "$INFIFPO_SOURCES" != *,* ]]; then
    INFIFPO_SOURCES="$(infifpo_abspath "$INFIFPO_SOURCES")"
  fi

  # Used by the scripts that source this file.
  # shellcheck disable=SC2034
  INFIFPO_LOG_DIR="${INFIFPO_OUT}/logs"
  INFIFPO_STATUS_DIR="${INFIFPO_OUT}/status"
  INFIFPO_MODELS_TSV="${INFIFPO_OUT}/models.tsv"
  # shellcheck disable=SC2034
  INFIFPO_SCORES_DIR="${INFIFPO_OUT}/scores"
  INFIFPO_MERGED="${INFIFPO_OUT}/merge/train.scored.parquet"
  INFIFPO_TRAIN_DIR="${INFIFPO_OUT}/train"
  # shellcheck disable=SC2034
  INFIFPO_EXPORT_DIR="${INFIFPO_OUT}/hf"
  INFIFPO_EVAL_DIR="${INFIFPO_OUT}/eval"
  [ -z "$INFIFPO_EVAL_INITIAL_PIVOT" ] || INFIFPO_EVAL_INITIAL_PIVOT="$(infifpo_abspath "$INFIFPO_EVAL_INITIAL_PIVOT")"
  [ -z "$INFIFPO_EVAL_INCLUDE_PATH" ] || INFIFPO_EVAL_INCLUDE_PATH="$(infifpo_abspath "$INFIFPO_EVAL_INCLUDE_PATH")"
  # Training data: the merge stage's output unless a scored set is given (standalone runs).
  : "${INFIFPO_TRAIN_DATA:=${INFIFPO_MERGED}}"
  INFIFPO_TRAIN_DATA="$(infifpo_abspath "$INFIFPO_TRAIN_DATA")"

  # The start from prompts (slurm/prompts.sh): its settings, and INFIFPO_DATA = its pairs.
  infifpo_load_prompt_settings

  # Jobs submitted later inherit the environment (sbatch --export=ALL): export everything so
  # each stage sees exactly the orchestrator's settings.
  local var
  for var in $(compgen -v INFIFPO_); do
    # shellcheck disable=SC2163  # exporting the variable named by $var is the point
    export "$var"
  done
  # Recipes import nemo_infifpo from the repo even when it is not pip-installed (containers).
  case ":${PYTHONPATH:-}:" in
    *":${INFIFPO_REPO}:"*) ;;
    *) export PYTHONPATH="${INFIFPO_REPO}${PYTHONPATH:+:${PYTHONPATH}}" ;;
  esac
}

infifpo_require_data() {
  [ -n "$INFIFPO_DATA" ] || infifpo_die "INFIFPO_DATA is not set (the preference rows to train on; or INFIFPO_PROMPTS to start from prompts)"
}

infifpo_cpu_mode() { [ "$INFIFPO_GPUS_PER_NODE" -eq 0 ]; }

# ------------------------------------------------------------------ sbatch / srun flags

# Flags every submission gets: account, partition, user extras, stage extras.
infifpo_common_sbatch_flags() {
  local -n _flags="$1"
  local _stage_var="$2" _extra=()
  _flags=()
  [ -z "$INFIFPO_ACCOUNT" ] || _flags+=("--account=${INFIFPO_ACCOUNT}")
  [ -z "$INFIFPO_PARTITION" ] || _flags+=("--partition=${INFIFPO_PARTITION}")
  infifpo_split_words _extra "$INFIFPO_SBATCH_ARGS"
  _flags+=("${_extra[@]}")
  if [ -n "$_stage_var" ]; then
    infifpo_split_words _extra "${!_stage_var}"
    _flags+=("${_extra[@]}")
  fi
}

# pyxis flags for srun: the stages run inside INFIFPO_CONTAINER_IMAGE when it is set. Mount
# the repo, the data, the models and INFIFPO_OUT at the same paths inside the container.
infifpo_container_flags() {
  local -n _cflags="$1"
  _cflags=()
  if [ -n "$INFIFPO_CONTAINER_IMAGE" ]; then
    _cflags+=("--container-image=${INFIFPO_CONTAINER_IMAGE}")
    [ -z "$INFIFPO_CONTAINER_MOUNTS" ] || _cflags+=("--container-mounts=${INFIFPO_CONTAINER_MOUNTS}")
    _cflags+=("--container-workdir=${INFIFPO_REPO}")
  fi
}

# Dependency flags: afterok on every non-empty job id given; nothing when none.
infifpo_dependency_flags() {
  local -n _dflags="$1"
  shift
  local _ids=() _id _joined
  for _id in "$@"; do [ -z "$_id" ] || _ids+=("$_id"); done
  _dflags=()
  if [ "${#_ids[@]}" -gt 0 ]; then
    _joined="$(IFS=:; printf '%s' "${_ids[*]}")"
    # kill-on-invalid-dep: a failed upstream stage cancels this job instead of leaving it
    # pending forever (same as DependencyParameters=kill_invalid_depend, per job).
    _dflags=("--dependency=afterok:${_joined}" "--kill-on-invalid-dep=yes")
  fi
}

# sbatch --parsable with a clean environment; prints the job id. The orchestrator runs
# inside its own allocation, and SLURM_* variables of that allocation (SLURM_NTASKS,
# SLURM_CPUS_PER_TASK, SLURM_EXPORT_ENV, ...) would otherwise be read by sbatch/srun of the
# new job as if the user had asked for them.
# With INFIFPO_DRY_RUN=1 it only prints the command (stderr) and a made-up id.
infifpo_sbatch() {
  local out
  if [ "${INFIFPO_DRY_RUN:-0}" = 1 ]; then
    printf 'dry run: sbatch --parsable' >&2
    printf ' %q' "$@" >&2
    printf '\n' >&2
    printf 'dry-%s\n' "$(basename "${*: -1}" .sbatch)"
    return 0
  fi
  out="$(
    for var in $(compgen -e SLURM_); do
      [ "$var" = SLURM_CONF ] || unset "$var"
    done
    sbatch --parsable "$@"
  )" || infifpo_die "sbatch $* failed"
  printf '%s\n' "${out%%;*}"
}

# Compresses "0 1 2 5" into "0-2,5" for --array.
infifpo_array_spec() {
  local out="" start="" prev="" i
  for i in "$@"; do
    if [ -n "$prev" ] && [ "$i" -eq $((prev + 1)) ]; then
      prev=$i
      continue
    fi
    [ -z "$start" ] || out+="${out:+,}$([ "$start" = "$prev" ] && printf '%s' "$start" || printf '%s-%s' "$start" "$prev")"
    start=$i prev=$i
  done
  [ -z "$start" ] || out+="${out:+,}$([ "$start" = "$prev" ] && printf '%s' "$start" || printf '%s-%s' "$start" "$prev")"
  printf '%s' "$out"
}

# The step launcher inside a stage job: srun with the container flags. --kill-on-bad-exit:
# one failed rank ends the step instead of leaving the others blocked in a collective.
# infifpo_srun_prefix fills an array (for callers that must start srun itself in the
# background: a backgrounded shell function is a subshell, and signals sent to it would not
# reach srun).
infifpo_srun_prefix() {
  local -n _prefix="$1"
  local _pflags=()
  infifpo_container_flags _pflags
  _prefix=(srun --kill-on-bad-exit=1 "${_pflags[@]}")
}

infifpo_srun() {
  local prefix=()
  infifpo_srun_prefix prefix
  "${prefix[@]}" "$@"
}

# ------------------------------------------------------------------ the models list

# Writes $INFIFPO_MODELS_TSV from INFIFPO_PIVOT / INFIFPO_SOURCES (slurm/models_list.py),
# atomically, so concurrent writers (array tasks of a standalone score.sbatch) are harmless.
infifpo_write_models_tsv() {
  mkdir -p "$INFIFPO_OUT"
  local tmp="${INFIFPO_MODELS_TSV}.tmp.$$" py=("$INFIFPO_PYTHON")
  # Inside an allocation with a container image, run the helper where Python lives.
  if [ -n "$INFIFPO_CONTAINER_IMAGE" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    local cflags=()
    infifpo_container_flags cflags
    py=(srun --ntasks=1 --nodes=1 "${cflags[@]}" "$INFIFPO_PYTHON")
  fi
  if ! "${py[@]}" "${INFIFPO_REPO}/slurm/models_list.py" --pivot "$INFIFPO_PIVOT" \
    --sources "$INFIFPO_SOURCES" --models-dir "$INFIFPO_MODELS_DIR" >"$tmp"; then
    rm -f "$tmp"
    infifpo_die "could not build the models list from INFIFPO_PIVOT='${INFIFPO_PIVOT}' INFIFPO_SOURCES='${INFIFPO_SOURCES}'"
  fi
  mv -f "$tmp" "$INFIFPO_MODELS_TSV"
}

# Number of models (scoring array tasks = models x shards).
infifpo_model_count() {
  grep -vc '^#' "$INFIFPO_MODELS_TSV"
}

# Reads model <index> into MODEL_NAME MODEL_PATH MODEL_BACKEND MODEL_TP MODEL_PP
# MODEL_OVERRIDES (extra score.py overrides of that model, space-separated).
infifpo_read_model() {
  local want="$1" index name path backend tp pp overrides
  while IFS=$'\t' read -r index name path backend tp pp overrides; do
    [[ "$index" == \#* ]] && continue
    if [ "$index" = "$want" ]; then
      # shellcheck disable=SC2034  # read by the callers
      MODEL_NAME="$name" MODEL_PATH="$path" MODEL_BACKEND="$backend" MODEL_TP="$tp" MODEL_PP="$pp" MODEL_OVERRIDES="$overrides"
      return 0
    fi
  done <"$INFIFPO_MODELS_TSV"
  infifpo_die "model ${want} not in ${INFIFPO_MODELS_TSV}"
}

# Model names in order (pivot first), one per line.
infifpo_model_names() {
  grep -v '^#' "$INFIFPO_MODELS_TSV" | cut -f 2
}

# Ranks of one scoring job: every GPU it asks for, or INFIFPO_SCORE_TASKS on CPU.
infifpo_score_ranks() {
  if infifpo_cpu_mode; then printf '%s\n' "$INFIFPO_SCORE_TASKS"; else printf '%s\n' "$INFIFPO_SCORE_GPUS"; fi
}

# ------------------------------------------------------------------ unit keys

# The inputs a unit's result depends on, as one line; its .complete marker must repeat it.
# Changing any of these (another model, other data, another config) makes the unit stale.
infifpo_unit_key() {
  local unit="$1"
  case "$unit" in
    score.*)
      local task="${unit#score.}" model shard
      model=$((task / INFIFPO_SCORE_SHARDS))
      shard=$((task % INFIFPO_SCORE_SHARDS))
      infifpo_read_model "$model"
      printf 'score name=%s path=%s backend=%s data=%s shard=%s/%s dtype=%s overrides=%s %s\n' \
        "$MODEL_NAME" "$MODEL_PATH" "$MODEL_BACKEND" "$INFIFPO_DATA" "$shard" \
        "$INFIFPO_SCORE_SHARDS" "$INFIFPO_SCORE_DTYPE" "$MODEL_OVERRIDES" "$INFIFPO_SCORE_OVERRIDES"
      ;;
    merge)
      printf 'merge data=%s models=%s overrides=%s\n' "$INFIFPO_DATA" \
        "$(grep -v '^#' "$INFIFPO_MODELS_TSV" | cut -f 2,3 | tr '\t\n' '=,')" "$INFIFPO_MERGE_OVERRIDES"
      ;;
    train)
      # Not the node count or layout: a resumed run may use another one.
      printf 'train config=%s config_dir=%s pivot=%s data=%s overrides=%s\n' "$INFIFPO_CONFIG" \
        "$INFIFPO_CONFIG_DIR" "$(infifpo_read_model 0 && printf '%s' "$MODEL_PATH")" \
        "$INFIFPO_TRAIN_DATA" "$INFIFPO_OVERRIDES"
      ;;
    export)
      printf 'export train=%s checkpoint=%s overrides=%s\n' "$INFIFPO_TRAIN_DIR" \
        "$INFIFPO_EXPORT_CHECKPOINT" "$INFIFPO_EXPORT_OVERRIDES"
      ;;
    eval)
      # The recipe itself re-evaluates a model whose files changed (e.g. a new export).
      printf 'eval models=%s backend=%s benchmarks=%s tasks=%s include=%s limit=%s code=%s overrides=%s\n' \
        "$(infifpo_eval_models | tr '\t\n' '=,')" "$INFIFPO_EVAL_BACKEND" "$INFIFPO_EVAL_BENCHMARKS" \
        "$INFIFPO_EVAL_TASKS" "$INFIFPO_EVAL_INCLUDE_PATH" "$INFIFPO_EVAL_LIMIT" "$INFIFPO_EVAL_ALLOW_CODE" \
        "$INFIFPO_EVAL_OVERRIDES"
      ;;
    *) infifpo_prompt_unit_key "$unit" || infifpo_die "unknown unit '${unit}'" ;;
  esac
}

# The models the evaluation stage compares, one "name<TAB>path" per line, the baseline first:
# the initial pivot (before SFT, when INFIFPO_EVAL_INITIAL_PIVOT names it; the pipeline's pivot
# is then the SFT model), the pipeline's pivot, the fused model, and with INFIFPO_EVAL_SOURCES=1
# every source.
infifpo_eval_models() {
  local pivot_name=pivot
  if [ -n "$INFIFPO_EVAL_INITIAL_PIVOT" ]; then
    printf 'pivot\t%s\n' "$INFIFPO_EVAL_INITIAL_PIVOT"
    pivot_name=sft
  fi
  infifpo_read_model 0
  printf '%s\t%s\n' "$pivot_name" "$MODEL_PATH"
  printf 'fused\t%s\n' "$INFIFPO_EXPORT_DIR"
  if [ "$INFIFPO_EVAL_SOURCES" = 1 ]; then
    grep -v '^#' "$INFIFPO_MODELS_TSV" | awk -F '\t' '$1 != 0 { print $2 "\t" $3 }'
  fi
}

# ------------------------------------------------------------------ status markers

infifpo_marker() { printf '%s/%s.%s' "$INFIFPO_STATUS_DIR" "$1" "$2"; }

infifpo_write_file_atomic() {
  local path="$1" tmp
  tmp="$(dirname "$path")/.$(basename "$path").tmp.$$"
  cat >"$tmp"
  mv -f "$tmp" "$path"
}

# True when <unit> finished successfully from the inputs it would use now.
infifpo_is_complete() {
  local unit="$1" marker key
  marker="$(infifpo_marker "$unit" complete)"
  [ -f "$marker" ] || return 1
  key="$(infifpo_unit_key "$unit")"
  [ "$(head -n 1 "$marker")" = "$key" ]
}

# Called first thing in a stage job: clear old results, record the start, and arrange for
# a failure marker if the job exits non-zero.
infifpo_unit_begin() {
  INFIFPO_UNIT="$1"
  mkdir -p "$INFIFPO_STATUS_DIR" "$INFIFPO_LOG_DIR"
  rm -f "$(infifpo_marker "$INFIFPO_UNIT" complete)" "$(infifpo_marker "$INFIFPO_UNIT" failed)"
  printf 'job=%s host=%s time=%s restart=%s\n' "$(infifpo_job_ref)" "$(hostname -s)" \
    "$(date '+%s.%N')" "${SLURM_RESTART_COUNT:-0}" | infifpo_write_file_atomic "$(infifpo_marker "$INFIFPO_UNIT" started)"
  trap 'infifpo_unit_exit_trap' EXIT
  infifpo_refresh_pipeline_json || true
  infifpo_log "started (job $(infifpo_job_ref) on $(hostname -s))"
}

infifpo_unit_exit_trap() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    printf 'exit=%s job=%s time=%s\n' "$rc" "$(infifpo_job_ref)" "$(date '+%s.%N')" |
      infifpo_write_file_atomic "$(infifpo_marker "$INFIFPO_UNIT" failed)"
    infifpo_log "failed (exit ${rc})"
  fi
  infifpo_refresh_pipeline_json || true
  return "$rc"
}

infifpo_unit_complete() {
  local unit="$1"
  {
    infifpo_unit_key "$unit"
    printf 'job=%s host=%s time=%s\n' "$(infifpo_job_ref)" "$(hostname -s)" "$(date '+%s.%N')"
  } | infifpo_write_file_atomic "$(infifpo_marker "$unit" complete)"
  infifpo_log "complete"
}

# This job as the user sees it: 123 or, for an array task, 120_3.
infifpo_job_ref() {
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
    printf '%s_%s' "$SLURM_ARRAY_JOB_ID" "$SLURM_ARRAY_TASK_ID"
  else
    printf '%s' "${SLURM_JOB_ID:-local}"
  fi
}

# All units of the pipeline, in order.
infifpo_units() {
  local tasks i
  tasks=$(($(infifpo_model_count) * INFIFPO_SCORE_SHARDS))
  for ((i = 0; i < tasks; i++)); do printf 'score.%s\n' "$i"; done
  printf '%s\n' merge train export
  [ "$INFIFPO_EVAL" != 1 ] || printf 'eval\n'
}

# complete | failed | running | submitted | stale | missing — from the markers alone
# (pipeline.json refines it with Slurm's job state: cancelled, timeout, requeued, ...).
infifpo_unit_state() {
  local unit="$1"
  if infifpo_is_complete "$unit"; then
    printf 'complete'
  elif [ -f "$(infifpo_marker "$unit" complete)" ]; then
    printf 'stale'
  elif [ -f "$(infifpo_marker "$unit" failed)" ]; then
    printf 'failed'
  elif [ -f "$(infifpo_marker "$unit" started)" ]; then
    printf 'running'
  elif [ -f "$(infifpo_marker "$unit" job)" ]; then
    printf 'submitted'
  else
    printf 'missing'
  fi
}

# Slurm's view of a job (PENDING, RUNNING, COMPLETED, CANCELLED, ...), or nothing once
# slurmctld has forgotten it (MinJobAge).
infifpo_slurm_state() {
  local id="$1"
  [ -n "$id" ] || return 0
  scontrol show job -o "$id" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -n 1
}

# ------------------------------------------------------------------ pipeline.json

infifpo_json_str() {
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  s="${s//$'\t'/\\t}"
  s="${s//$'\r'/\\r}"
  printf '"%s"' "$s"
}

# A unit's job id, state and Slurm job state into UNIT_JOB, UNIT_STATE, UNIT_SLURM.
infifpo_unit_info() {
  local unit="$1"
  UNIT_JOB="" UNIT_SLURM=""
  [ -f "$(infifpo_marker "$unit" job)" ] && UNIT_JOB="$(head -n 1 "$(infifpo_marker "$unit" job)")"
  UNIT_STATE="$(infifpo_unit_state "$unit")"
  # Only ask Slurm about units that may still be in flight; finished ones are settled.
  if [ -n "$UNIT_JOB" ] && [ "$UNIT_STATE" != complete ] && command -v scontrol >/dev/null; then
    UNIT_SLURM="$(infifpo_slurm_state "$UNIT_JOB")"
    # What the markers cannot know: a job cancelled before it started (failed upstream
    # dependency), killed from outside, or back in the queue after a requeue.
    case "${UNIT_STATE}:${UNIT_SLURM}" in
      submitted:CANCELLED | submitted:FAILED | submitted:TIMEOUT | submitted:NODE_FAIL | submitted:BOOT_FAIL | \
        submitted:DEADLINE | running:CANCELLED | running:TIMEOUT | running:NODE_FAIL | running:OUT_OF_MEMORY)
        UNIT_STATE="${UNIT_SLURM,,}"
        ;;
      running:PENDING | running:REQUEUED* | failed:PENDING | failed:REQUEUED*) UNIT_STATE=requeued ;;
    esac
  fi
}

infifpo_unit_json_from_info() {
  printf '{"job_id": %s, "state": %s, "slurm_state": %s}' "$(infifpo_json_str "$UNIT_JOB")" \
    "$(infifpo_json_str "$UNIT_STATE")" "$(infifpo_json_str "$UNIT_SLURM")"
}

infifpo_settings_json() {
  local first=1 var
  printf '{'
  for var in $(compgen -v INFIFPO_ | sort); do
    case "$var" in INFIFPO_UNIT | INFIFPO_SLURM_*) continue ;; esac
    [ "$first" -eq 1 ] || printf ', '
    first=0
    printf '%s: %s' "$(infifpo_json_str "$var")" "$(infifpo_json_str "${!var}")"
  done
  printf '}'
}

# The aggregate state of several units (the first of these that any unit is in).
infifpo_aggregate_state() {
  local states=" $* " s
  for s in failed cancelled timeout node_fail out_of_memory running requeued submitted stale missing; do
    if [[ "$states" == *" $s "* ]]; then
      printf '%s' "$s"
      return 0
    fi
  done
  printf 'complete'
}

infifpo_pipeline_json() {
  local settings="{}" orchestrator="" first=1 index name path backend tp pp overrides unit
  local score_states=()
  [ -f "${INFIFPO_STATUS_DIR}/settings.json" ] && settings="$(cat "${INFIFPO_STATUS_DIR}/settings.json")"
  [ -f "${INFIFPO_STATUS_DIR}/pipeline.job" ] && orchestrator="$(head -n 1 "${INFIFPO_STATUS_DIR}/pipeline.job")"
  printf '{\n  "pipeline_job_id": %s,\n' "$(infifpo_json_str "$orchestrator")"
  printf '  "updated_at": %s,\n' "$(infifpo_json_str "$(date -u '+%FT%TZ')")"
  printf '  "output_dir": %s,\n  "models": [' "$(infifpo_json_str "$INFIFPO_OUT")"
  while IFS=$'\t' read -r index name path backend tp pp overrides; do
    [[ "$index" == \#* ]] && continue
    [ "$first" -eq 1 ] || printf ','
    first=0
    printf '\n    {"index": %s, "name": %s, "path": %s, "backend": %s, "tp": %s, "pp": %s, "score_overrides": %s}' \
      "$index" "$(infifpo_json_str "$name")" "$(infifpo_json_str "$path")" \
      "$(infifpo_json_str "$backend")" "$tp" "$pp" "$(infifpo_json_str "$overrides")"
  done <"$INFIFPO_MODELS_TSV"
  printf '\n  ],\n  "stages": {'
  infifpo_prompt_stages_json
  printf '\n    "score": {"tasks": {'
  first=1
  while read -r unit; do
    infifpo_unit_info "$unit"
    case "$unit" in
      score.*)
        [ "$first" -eq 1 ] || printf ','
        first=0
        printf '\n      %s: %s' "$(infifpo_json_str "${unit#score.}")" "$(infifpo_unit_json_from_info)"
        score_states+=("$UNIT_STATE")
        ;;
      merge)
        printf '\n    }, "state": %s},' "$(infifpo_json_str "$(infifpo_aggregate_state "${score_states[@]}")")"
        printf '\n    "merge": %s,' "$(infifpo_unit_json_from_info)"
        ;;
      train) printf '\n    "train": %s,' "$(infifpo_unit_json_from_info)" ;;
      export) printf '\n    "export": %s' "$(infifpo_unit_json_from_info)" ;;
      eval)
        # Where the comparison table is (or will be): what `train_phi4.sh --status` points to.
        printf ',\n    "eval": {"job_id": %s, "state": %s, "slurm_state": %s, "summary": %s}' \
          "$(infifpo_json_str "$UNIT_JOB")" "$(infifpo_json_str "$UNIT_STATE")" \
          "$(infifpo_json_str "$UNIT_SLURM")" "$(infifpo_json_str "${INFIFPO_EVAL_DIR}/summary.md")"
        ;;
    esac
  done < <(infifpo_units)
  printf '\n  },\n  "settings": %s\n}\n' "$settings"
}

# Rebuilds $INFIFPO_OUT/pipeline.json from models.tsv and the status markers, under a lock,
# into a temporary file that is then renamed, so readers never see half a file. Settings
# and the orchestrator's job id come from status/settings.json and status/pipeline.job.
infifpo_refresh_pipeline_json() {
  [ -f "$INFIFPO_MODELS_TSV" ] || return 0
  mkdir -p "$INFIFPO_STATUS_DIR"
  (
    # Several array tasks may finish at once; serialise the rewrites.
    if command -v flock >/dev/null; then flock -w 30 9 || true; fi
    infifpo_pipeline_json | infifpo_write_file_atomic "${INFIFPO_OUT}/pipeline.json"
  ) 9>"${INFIFPO_STATUS_DIR}/.lock"
}

# ------------------------------------------------------------------ the start from prompts

# shellcheck source=slurm/prompts.sh
source "$(dirname "${BASH_SOURCE[0]}")/prompts.sh"
