#!/usr/bin/env bash
# InfiFPO on a Slurm cluster, end to end: score every model -> merge -> train -> export -> evaluate,
# or, from prompts: generate -> judge -> build pairs -> SFT -> export SFT -> the same stages.
#
#   sbatch slurm/train_phi4.sh            (or: bash slurm/train_phi4.sh — it only submits)
#   bash slurm/train_phi4.sh --status     refresh and print $INFIFPO_OUT/pipeline.json
#
# This job only submits the stages, chained with --dependency=afterok and
# --kill-on-invalid-dep=yes (a failed stage cancels everything after it), prints each job id
# and writes $INFIFPO_OUT/pipeline.json (job ids, stage states, settings), then exits:
#   score   slurm/score.sbatch   array, task 0 = the initial pivot, then one task per source
#   merge   slurm/merge.sbatch   after all scoring tasks
#   train   slurm/train.sbatch   INFIFPO_NODES x INFIFPO_GPUS_PER_NODE; requeues itself on
#                                SIGUSR1 (time limit) after checkpointing, and resumes
#   export  slurm/export.sbatch  -> $INFIFPO_OUT/hf, a Hugging Face checkpoint
#   eval    slurm/evaluate.sbatch  lm-eval on the paper's benchmarks: initial pivot, SFT model,
#                                fused model -> $INFIFPO_OUT/eval/summary.md (--status shows it)
# With INFIFPO_PROMPTS (instead of INFIFPO_DATA), before all of them (slurm/prompts.sh):
#   generate   slurm/generate.sbatch  array over models x shards: the pivot and every source
#                                answer every prompt (samples, temperature from the sources YAML)
#   judge      slurm/judge.sbatch     array over shards: the reward model scores every answer
#   pairs      slurm/pairs.sbatch     best -> chosen, worst -> rejected; SFT half / preference half
#   sft        slurm/train.sbatch     the pivot trained on the SFT half (INFIFPO_SFT_CONFIG)
#   sft_export slurm/export.sbatch    -> $INFIFPO_OUT/sft/hf: p0, the pivot scored and trained next
# Rerunning it is safe: stages (and scoring tasks) whose outputs are complete for the same
# inputs are skipped, the rest is resubmitted (only the missing scoring tasks, as
# --array=<indices>), and training resumes from its last checkpoint. It refuses to start while
# jobs of an earlier submission into the same INFIFPO_OUT are still queued or running.
#
# Settings (environment variables; paths may be relative to the submit directory):
#   INFIFPO_DATA            preference rows (.jsonl/.json/.parquet/datasets dir)   [this or
#                           INFIFPO_PROMPTS]
#   INFIFPO_PROMPTS         prompts (a "prompt" string or messages, optional "id", extra columns
#                           kept): start from prompts instead of pairs                  [none]
#   INFIFPO_SOURCES         sources: a sources YAML, or comma-separated model directories
#                           PATH[:BACKEND[:TP[:PP]]] (BACKEND megatron|hf|auto)
#                           [configs/sources/phi4_paper.yaml: the paper's five sources]
#   INFIFPO_PIVOT           the pivot's model directory, same syntax [the YAML's pivot]
#   INFIFPO_MODELS_DIR      base for relative model paths in a sources YAML [its models_dir]
#   INFIFPO_CONFIG          training config name (configs/<name>.yaml) [infifpo_phi4]
#   INFIFPO_CONFIG_DIR      an extra Hydra config directory (--config-dir) [none]
#   INFIFPO_OVERRIDES       extra Hydra overrides for training, space-separated, shell quoting
#                           e.g. "trainer.max_steps=200 optim.lr=5e-7" [none]
#   INFIFPO_TP, INFIFPO_PP  training tensor / pipeline parallel sizes [the config's]
#   INFIFPO_OUT             output directory, shared by all nodes [<repo>/outputs/<config>]
#   INFIFPO_NODES           training nodes [2]
#   INFIFPO_GPUS_PER_NODE   GPUs per node [8]; 0 = CPU only: gloo, no GPUs requested
#   INFIFPO_TASKS_PER_NODE  training tasks per node when INFIFPO_GPUS_PER_NODE=0 [2]
#   INFIFPO_CPUS_PER_TASK   --cpus-per-task for scoring and training tasks [cluster default]
#   INFIFPO_SCORE_GPUS      GPUs (= ranks) per scoring task, on one node [INFIFPO_GPUS_PER_NODE];
#                           each model replica uses TP x PP of them, the rest is data parallel
#   INFIFPO_SCORE_TASKS     ranks per scoring task when INFIFPO_GPUS_PER_NODE=0 [1]
#   INFIFPO_SCORE_SHARDS    array tasks per model (shard.count) [1]
#   INFIFPO_SCORE_PARALLEL  at most this many scoring tasks at once (--array=...%N) [no limit]
#   INFIFPO_SCORE_DTYPE     scoring dtype [bfloat16 on GPUs, float32 on CPU]
#   INFIFPO_SCORE_OVERRIDES / INFIFPO_MERGE_OVERRIDES / INFIFPO_EXPORT_OVERRIDES
#                           extra Hydra overrides for those stages [none]
#   INFIFPO_SCORE_TIME / _MERGE_TIME / _TRAIN_TIME / _EXPORT_TIME   --time per stage
#                           [04:00:00 / 01:00:00 / 04:00:00 / 01:00:00]; training continues
#                           over several time-limited jobs through requeueing
#   INFIFPO_SIGNAL_SECONDS  training gets SIGUSR1 this long before its time limit [300]
#   INFIFPO_CONTAINER_IMAGE pyxis/enroot image for every stage (srun --container-image) [none]
#   INFIFPO_CONTAINER_MOUNTS  srun --container-mounts: mount the repo, data, models and
#                           INFIFPO_OUT at the same paths, e.g. /lustre:/lustre [none]
#   INFIFPO_ACCOUNT, INFIFPO_PARTITION   --account / --partition of every job [none]
#   INFIFPO_SBATCH_ARGS     extra sbatch flags for every stage, e.g. "--qos=high" [none]
#   INFIFPO_{SCORE,MERGE,TRAIN,EXPORT}_SBATCH_ARGS  extra flags for one stage,
#                           e.g. INFIFPO_EXPORT_SBATCH_ARGS="--mem=200G" [none]
#   INFIFPO_PYTHON          interpreter with nemo_infifpo installed (or in the image) [python]
#   INFIFPO_REPO            the nemo-infifpo checkout [the directory sbatch was given the
#                           script from, else the submit directory]
#   INFIFPO_EVAL            1 = evaluate after the export, 0 = stop at the export [1]
#   INFIFPO_EVAL_INITIAL_PIVOT  the pivot before SFT, when INFIFPO_PIVOT is the SFT model:
#                           evaluated as "pivot" and INFIFPO_PIVOT as "sft" [none: INFIFPO_PIVOT
#                           is evaluated as "pivot"]
#   INFIFPO_EVAL_SOURCES    1 = also evaluate every source [0]
#   INFIFPO_EVAL_BACKEND    vllm | hf [vllm with GPUs, hf on CPU]
#   INFIFPO_EVAL_GPUS       GPUs of the evaluation job, one node; vLLM tensor parallel size
#                           [1; 0 on CPU]
#   INFIFPO_EVAL_BENCHMARKS task list, configs/benchmarks/<name>.yaml [infifpo_paper_no_code,
#                           or infifpo_paper with INFIFPO_EVAL_ALLOW_CODE=1]
#   INFIFPO_EVAL_ALLOW_CODE 1 = run HumanEval/MBPP, which execute model-written code
#                           (confirm_run_unsafe_code=true, HF_ALLOW_CODE_EVAL=1) [0]
#   INFIFPO_EVAL_TASKS      comma-separated lm-eval tasks instead of the benchmark list [none]
#   INFIFPO_EVAL_INCLUDE_PATH  a directory of extra lm-eval task YAML files [none]
#   INFIFPO_EVAL_LIMIT      samples per task, for a quick look [all]
#   INFIFPO_EVAL_OVERRIDES  extra Hydra overrides for recipes/evaluate.py [none]
#   INFIFPO_EVAL_TIME       --time of the evaluation job [08:00:00]
#   INFIFPO_EVAL_PYTHON     interpreter of the evaluation stage, with lm-eval (and vllm)
#                           [INFIFPO_PYTHON]
#   INFIFPO_EVAL_CONTAINER_IMAGE, INFIFPO_EVAL_CONTAINER_MOUNTS  its container and mounts;
#                           "none" for no container [INFIFPO_CONTAINER_IMAGE / _MOUNTS]
#   INFIFPO_EVAL_SBATCH_ARGS  extra sbatch flags of the evaluation job [none]
#   Start from prompts (INFIFPO_PROMPTS):
#   INFIFPO_JUDGE           the judge: a reward model directory, or function:package.module:name
#                           [the sources YAML's judge]
#   INFIFPO_GENERATE_SHARDS / INFIFPO_JUDGE_SHARDS  array tasks per model / of the judge [1 / 1]
#   INFIFPO_GENERATE_PARALLEL  at most this many generation tasks at once [no limit]
#   INFIFPO_GENERATE_BACKEND   vllm | hf for every model [the sources YAML's, vllm]
#   INFIFPO_GENERATE_DTYPE  [bfloat16 on GPUs, float32 on CPU]
#   INFIFPO_JUDGE_GPUS      GPUs (= data-parallel ranks) of a judge task [INFIFPO_GPUS_PER_NODE];
#                           INFIFPO_JUDGE_TASKS ranks on CPU [1]
#   INFIFPO_GENERATE_OVERRIDES / INFIFPO_JUDGE_OVERRIDES / INFIFPO_PAIRS_OVERRIDES
#                           extra Hydra overrides (e.g. "pairs.min_gap=0.5") [none]
#   INFIFPO_SFT_CONFIG      SFT config (configs/<name>.yaml) [sft_phi4]; INFIFPO_SFT_OVERRIDES,
#                           INFIFPO_SFT_TP, INFIFPO_SFT_PP, INFIFPO_SFT_NODES [none / config's /
#                           INFIFPO_NODES]
#   INFIFPO_GENERATE_TIME / _JUDGE_TIME / _PAIRS_TIME / _SFT_TIME  [08:00:00 / 04:00:00 /
#                           01:00:00 / INFIFPO_TRAIN_TIME]; INFIFPO_{GENERATE,JUDGE,PAIRS,SFT}_SBATCH_ARGS
#   INFIFPO_GENERATE_PYTHON, INFIFPO_GENERATE_CONTAINER_IMAGE, INFIFPO_GENERATE_CONTAINER_MOUNTS,
#   INFIFPO_JUDGE_PYTHON, INFIFPO_JUDGE_CONTAINER_IMAGE, INFIFPO_JUDGE_CONTAINER_MOUNTS
#                           the generation's / judge's own interpreter and container (vLLM
#                           usually lives in its own environment); "none" = no container
#                           [INFIFPO_PYTHON / INFIFPO_CONTAINER_IMAGE / _MOUNTS]
#   INFIFPO_DRY_RUN=1       only print the sbatch commands (run with bash, not sbatch);
#                           writes nothing but INFIFPO_OUT/models.tsv
#
# Outputs under INFIFPO_OUT (from prompts, also: generate.tsv, judge.tsv, generate/<model>/,
# judge/, pairs/{sft,pairs}.jsonl + report.json, sft/ with sft/hf = p0): models.tsv, scores/<model>/, merge/train.scored.parquet,
# train/ (checkpoints, metrics), hf/ (the result), eval/ (results per model, summary.md and
# summary.json), logs/<stage>-<jobid>.out, status/,
# pipeline.json. See slurm/common.sh for the status files.
#SBATCH --job-name=infifpo-pipeline
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
set -euo pipefail

# Under sbatch this file runs from a spool copy, so $0 does not lead to the repo: use
# INFIFPO_REPO, else the path sbatch was given (scontrol's Command=), else the submit dir.
infifpo_locate_repo() {
  local c cmd candidates=()
  if [ -n "${INFIFPO_REPO:-}" ]; then
    [ -f "${INFIFPO_REPO}/slurm/common.sh" ] || { echo "INFIFPO_REPO=${INFIFPO_REPO} has no slurm/common.sh" >&2; exit 1; }
    return 0
  fi
  if [ -n "${SLURM_JOB_ID:-}" ]; then
    cmd="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')"
    [ -z "$cmd" ] || candidates+=("$(dirname "$cmd")/..")
    candidates+=("${SLURM_SUBMIT_DIR:-.}" "${SLURM_SUBMIT_DIR:-.}/..")
  fi
  candidates+=("$(dirname "${BASH_SOURCE[0]}")/..")
  for c in "${candidates[@]}"; do
    if [ -f "${c}/slurm/common.sh" ]; then
      INFIFPO_REPO="$(cd "$c" && pwd)"
      return 0
    fi
  done
  echo "cannot find the nemo-infifpo repository: set INFIFPO_REPO" >&2
  exit 1
}
infifpo_locate_repo
# shellcheck source=slurm/common.sh
source "${INFIFPO_REPO}/slurm/common.sh"

# Job ids of earlier submissions into this INFIFPO_OUT that are still queued or running.
infifpo_active_jobs() {
  local recorded=() file id active=() line
  shopt -s nullglob
  for file in "${INFIFPO_STATUS_DIR}"/*.job "${INFIFPO_SFT_OUT}/status"/*.job; do
    [ "$(basename "$file")" = pipeline.job ] && continue
    id="$(head -n 1 "$file")"
    recorded+=("${id%%_*}")
  done
  shopt -u nullglob
  [ "${#recorded[@]}" -gt 0 ] || return 0
  # %A: job id, %F: array job id; both cover array tasks and plain jobs.
  while read -r line; do
    for id in $line; do
      if printf '%s\n' "${recorded[@]}" | grep -qx -- "$id"; then
        active+=("$id")
        break
      fi
    done
  done < <(squeue -h -u "$(id -un)" -o '%A %F' 2>/dev/null || true)
  [ "${#active[@]}" -eq 0 ] || printf '%s\n' "${active[@]}" | sort -u | tr '\n' ' '
}

infifpo_validate() {
  infifpo_require_data
  if infifpo_prompts_mode; then
    infifpo_validate_prompt_start
  else
    [ -e "$INFIFPO_DATA" ] || infifpo_die "INFIFPO_DATA=${INFIFPO_DATA} does not exist"
  fi
  local index name path backend tp pp overrides ranks
  ranks="$(infifpo_score_ranks)"
  [ "$ranks" -ge 1 ] || infifpo_die "scoring needs at least one rank (INFIFPO_SCORE_GPUS / INFIFPO_SCORE_TASKS)"
  # shellcheck disable=SC2034  # overrides: read to consume the column
  while IFS=$'\t' read -r index name path backend tp pp overrides; do
    [[ "$index" == \#* ]] && continue
    # From prompts the pivot is the SFT model, made by the pipeline itself.
    infifpo_prompts_mode && [ "$index" = 0 ] || [ -d "$path" ] ||
      infifpo_die "model ${name}: ${path} is not a directory (download it, or set INFIFPO_MODELS_DIR)"
    [ $((ranks % (tp * pp))) -eq 0 ] ||
      infifpo_die "model ${name}: TP x PP = ${tp} x ${pp} does not divide the ${ranks} ranks of a scoring task"
  done <"$INFIFPO_MODELS_TSV"
  local per_node=$INFIFPO_GPUS_PER_NODE
  infifpo_cpu_mode && per_node=$INFIFPO_TASKS_PER_NODE
  [ "$per_node" -ge 1 ] || infifpo_die "INFIFPO_TASKS_PER_NODE must be >= 1"
  local world=$((INFIFPO_NODES * per_node)) model_parallel=$((${INFIFPO_TP:-1} * ${INFIFPO_PP:-1}))
  [ $((world % model_parallel)) -eq 0 ] ||
    infifpo_die "training: ${world} ranks are not a multiple of TP x PP = ${INFIFPO_TP:-1} x ${INFIFPO_PP:-1}"
  [ -f "${INFIFPO_REPO}/recipes/train_infifpo.py" ] ||
    infifpo_log "warning: ${INFIFPO_REPO}/recipes/train_infifpo.py does not exist (yet)"
}

# Forget a unit's previous result before resubmitting it, and record the new job id.
infifpo_record_submission() {
  local unit="$1" job="$2" kind
  [ "$INFIFPO_DRY_RUN" != 1 ] || return 0
  for kind in complete failed started; do rm -f "$(infifpo_marker "$unit" "$kind")"; done
  printf '%s\n' "$job" | infifpo_write_file_atomic "$(infifpo_marker "$unit" job)"
}

infifpo_validate_prompt_start() {
  [ -f "$INFIFPO_PROMPTS" ] || [ -d "$INFIFPO_PROMPTS" ] || infifpo_die "INFIFPO_PROMPTS=${INFIFPO_PROMPTS} does not exist"
  local index name path backend tp rest kind target
  # shellcheck disable=SC2034  # rest: read to consume the columns
  while IFS=$'\t' read -r index name path backend tp rest; do
    [[ "$index" == \#* ]] && continue
    [ -d "$path" ] || infifpo_die "model ${name}: ${path} is not a directory (download it, or set INFIFPO_MODELS_DIR)"
  done <"$INFIFPO_GENERATE_TSV"
  IFS=$'\t' read -r kind target rest <"$INFIFPO_JUDGE_TSV"
  [ "$kind" != reward_model ] || [ -d "$target" ] || infifpo_die "judge: reward model ${target} is not a directory"
}

SCORE_JOB="" MERGE_JOB="" TRAIN_JOB="" EXPORT_JOB="" EVAL_JOB=""
GENERATE_JOB="" JUDGE_JOB="" PAIRS_JOB="" SFT_JOB="" SFT_EXPORT_JOB="" PROMPT_STAGE_LOG_DIR=""

# submit_array <unit prefix> <var for the job id> <script> <tasks> <parallel> <time> <upstream>
#   [sbatch flags...]: the array tasks that are not complete (all of them when something upstream
# was resubmitted), as --array=<indices>.
submit_array() {
  local unit_prefix="$1" var="$2" script="$3" tasks="$4" parallel="$5" time="$6" upstream="$7" missing=() i
  shift 7
  for ((i = 0; i < tasks; i++)); do
    [ -z "$upstream" ] && infifpo_is_complete "${unit_prefix}.${i}" || missing+=("$i")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    infifpo_log "$(printf '%-7s' "${unit_prefix}:") complete (${tasks} tasks), skipped"
    return 0
  fi
  local array flags=() deps=() job stage_var
  array="$(infifpo_array_spec "${missing[@]}")"
  [ -z "$parallel" ] || array+="%${parallel}"
  stage_var="INFIFPO_${unit_prefix^^}_SBATCH_ARGS"
  infifpo_common_sbatch_flags flags "$stage_var"
  infifpo_dependency_flags deps "$upstream"
  job="$(infifpo_sbatch --job-name="infifpo-${unit_prefix}" --array="$array" --time="$time" \
    --output="${INFIFPO_LOG_DIR}/${unit_prefix}-%A_%a.out" "${deps[@]}" "$@" "${flags[@]}" "${INFIFPO_REPO}/slurm/${script}")"
  for i in "${missing[@]}"; do infifpo_record_submission "${unit_prefix}.${i}" "${job}_${i}"; done
  printf -v "$var" '%s' "$job"
  infifpo_log "$(printf '%-7s' "${unit_prefix}:") job ${job} (array ${array}; $((tasks - ${#missing[@]})) of ${tasks} tasks already complete)"
}

# Training resources (INFIFPO_NODES nodes) into the array named by $1.
infifpo_train_flags() {
  local -n _tflags="$1"
  _tflags=(--nodes="$INFIFPO_NODES" --signal="B:USR1@${INFIFPO_SIGNAL_SECONDS}" --requeue)
  if infifpo_cpu_mode; then
    # gpus-per-node=0 overrides the GPU request in train.sbatch's header.
    _tflags+=(--ntasks-per-node="$INFIFPO_TASKS_PER_NODE" --gpus-per-node=0)
  else
    _tflags+=(--ntasks-per-node="$INFIFPO_GPUS_PER_NODE" --gpus-per-node="$INFIFPO_GPUS_PER_NODE")
  fi
  [ -z "$INFIFPO_CPUS_PER_TASK" ] || _tflags+=(--cpus-per-task="$INFIFPO_CPUS_PER_TASK")
}

# generate -> judge -> pairs -> sft -> sft_export: the start from prompts.
submit_prompt_stages() {
  local gpus cflags=()
  gpus="$(infifpo_generate_gpus)"
  if infifpo_cpu_mode; then cflags=(--nodes=1 --ntasks=1); else cflags=(--nodes=1 --ntasks=1 --gpus-per-node="$gpus"); fi
  [ -z "$INFIFPO_CPUS_PER_TASK" ] || cflags+=(--cpus-per-task="$INFIFPO_CPUS_PER_TASK")
  submit_array generate GENERATE_JOB generate.sbatch $(($(infifpo_generate_count) * INFIFPO_GENERATE_SHARDS)) \
    "$INFIFPO_GENERATE_PARALLEL" "$INFIFPO_GENERATE_TIME" "" "${cflags[@]}"

  if infifpo_cpu_mode; then cflags=(--nodes=1 --ntasks="$INFIFPO_JUDGE_TASKS"); else
    cflags=(--nodes=1 --ntasks="$INFIFPO_JUDGE_GPUS" --gpus-per-node="$INFIFPO_JUDGE_GPUS")
  fi
  [ -z "$INFIFPO_CPUS_PER_TASK" ] || cflags+=(--cpus-per-task="$INFIFPO_CPUS_PER_TASK")
  submit_array judge JUDGE_JOB judge.sbatch "$INFIFPO_JUDGE_SHARDS" "" "$INFIFPO_JUDGE_TIME" "$GENERATE_JOB" "${cflags[@]}"

  submit_stage pairs PAIRS_JOB pairs.sbatch "$JUDGE_JOB" --time="$INFIFPO_PAIRS_TIME"

  # SFT: the train and export stages on INFIFPO_OUT/sft (their own markers and models list).
  infifpo_with_sft_settings infifpo_write_models_tsv
  local sft_flags=()
  INFIFPO_NODES="$INFIFPO_SFT_NODES" infifpo_train_flags sft_flags
  PROMPT_STAGE_LOG_DIR="$INFIFPO_LOG_DIR"
  SFT_JOB="$(infifpo_with_sft_settings submit_sft_unit train train.sbatch sft "$PAIRS_JOB" \
    --time="$INFIFPO_SFT_TIME" "${sft_flags[@]}")"
  SFT_EXPORT_JOB="$(infifpo_with_sft_settings submit_sft_unit export export.sbatch sft_export "$SFT_JOB" \
    --time="$INFIFPO_EXPORT_TIME")"
}

# In the SFT settings (a subshell): submit <unit> (train or export) unless it is complete and
# nothing upstream was resubmitted; prints the job id (nothing when skipped).
submit_sft_unit() {
  local unit="$1" script="$2" label="$3" upstream="$4" flags=() deps=() job
  shift 4
  if [ -z "$upstream" ] && infifpo_is_complete "$unit"; then
    infifpo_log "$(printf '%-7s' "${label}:") complete, skipped"
    return 0
  fi
  [ "$INFIFPO_DRY_RUN" = 1 ] || mkdir -p "$INFIFPO_STATUS_DIR"
  infifpo_common_sbatch_flags flags "INFIFPO_${label^^}_SBATCH_ARGS"
  infifpo_dependency_flags deps "$upstream"
  job="$(infifpo_sbatch --job-name="infifpo-${label}" --output="${PROMPT_STAGE_LOG_DIR}/${label}-%j.out" \
    "${deps[@]}" "$@" "${flags[@]}" "${INFIFPO_REPO}/slurm/${script}")"
  infifpo_record_submission "$unit" "$job"
  infifpo_log "$(printf '%-7s' "${label}:") job ${job}${upstream:+ (after ${upstream})}"
  printf '%s\n' "$job"
}

submit_score() {
  local upstream="${1:-}" tasks missing=() i
  tasks=$(($(infifpo_model_count) * INFIFPO_SCORE_SHARDS))
  for ((i = 0; i < tasks; i++)); do
    # New pairs or a new p0 upstream: every model scores again.
    [ -z "$upstream" ] && infifpo_is_complete "score.${i}" || missing+=("$i")
  done
  if [ "${#missing[@]}" -eq 0 ]; then
    infifpo_log "score:  complete (${tasks} tasks), skipped"
    return 0
  fi
  local array flags=() cflags=() deps=()
  array="$(infifpo_array_spec "${missing[@]}")"
  [ -z "$INFIFPO_SCORE_PARALLEL" ] || array+="%${INFIFPO_SCORE_PARALLEL}"
  infifpo_common_sbatch_flags flags INFIFPO_SCORE_SBATCH_ARGS
  if infifpo_cpu_mode; then
    cflags=(--nodes=1 --ntasks="$INFIFPO_SCORE_TASKS")
  else
    cflags=(--nodes=1 --ntasks="$INFIFPO_SCORE_GPUS" --gpus-per-node="$INFIFPO_SCORE_GPUS")
  fi
  [ -z "$INFIFPO_CPUS_PER_TASK" ] || cflags+=(--cpus-per-task="$INFIFPO_CPUS_PER_TASK")
  infifpo_dependency_flags deps "$upstream"
  SCORE_JOB="$(infifpo_sbatch --job-name=infifpo-score --array="$array" --time="$INFIFPO_SCORE_TIME" \
    --output="${INFIFPO_LOG_DIR}/score-%A_%a.out" "${deps[@]}" "${cflags[@]}" "${flags[@]}" \
    "${INFIFPO_REPO}/slurm/score.sbatch")"
  for i in "${missing[@]}"; do infifpo_record_submission "score.${i}" "${SCORE_JOB}_${i}"; done
  infifpo_log "score:  job ${SCORE_JOB} (array ${array}; $((tasks - ${#missing[@]})) of ${tasks} tasks already complete)"
}

# submit_stage <unit> <var for the job id> <script> <upstream job id> [sbatch flags...]
# Skips the unit when it is complete and nothing upstream was resubmitted.
submit_stage() {
  local unit="$1" var="$2" script="$3" upstream="$4" stage_var
  shift 4
  if [ -z "$upstream" ] && infifpo_is_complete "$unit"; then
    infifpo_log "$(printf '%-7s' "${unit}:") complete, skipped"
    return 0
  fi
  local flags=() deps=() job
  stage_var="INFIFPO_${unit^^}_SBATCH_ARGS"
  infifpo_common_sbatch_flags flags "$stage_var"
  infifpo_dependency_flags deps "$upstream"
  job="$(infifpo_sbatch --job-name="infifpo-${unit}" --output="${INFIFPO_LOG_DIR}/${unit}-%j.out" \
    "${deps[@]}" "$@" "${flags[@]}" "${INFIFPO_REPO}/slurm/${script}")"
  infifpo_record_submission "$unit" "$job"
  printf -v "$var" '%s' "$job"
  infifpo_log "$(printf '%-7s' "${unit}:") job ${job}${upstream:+ (after ${upstream})}"
}

cmd_submit() {
  infifpo_load_settings
  mkdir -p "$INFIFPO_OUT" "$INFIFPO_LOG_DIR" "$INFIFPO_STATUS_DIR"
  infifpo_log "repo ${INFIFPO_REPO}; output ${INFIFPO_OUT}"

  # One submission at a time per output directory (two at once would both pass the check
  # below and submit every stage twice).
  exec 8>"${INFIFPO_STATUS_DIR}/.submit.lock"
  if command -v flock >/dev/null; then
    flock -n 8 || infifpo_die "another submission into ${INFIFPO_OUT} is running"
  fi
  local active
  active="$(infifpo_active_jobs)"
  [ -z "$active" ] || infifpo_die "jobs of an earlier submission are still queued or running: ${active}(wait, or scancel them)"

  infifpo_write_models_tsv
  if infifpo_prompts_mode; then
    infifpo_write_prompt_lists
    infifpo_prompt_eval_default
  fi
  infifpo_validate
  if [ "$INFIFPO_DRY_RUN" != 1 ]; then
    infifpo_settings_json | infifpo_write_file_atomic "${INFIFPO_STATUS_DIR}/settings.json"
    printf '%s\n' "${SLURM_JOB_ID:-none}" | infifpo_write_file_atomic "${INFIFPO_STATUS_DIR}/pipeline.job"
  fi

  if infifpo_prompts_mode; then
    submit_prompt_stages
    submit_score "${SFT_EXPORT_JOB:-$PAIRS_JOB}"
  else
    submit_score
  fi

  submit_stage merge MERGE_JOB merge.sbatch "$SCORE_JOB" --time="$INFIFPO_MERGE_TIME"

  local train_flags=()
  infifpo_train_flags train_flags
  train_flags+=(--time="$INFIFPO_TRAIN_TIME")
  submit_stage train TRAIN_JOB train.sbatch "$MERGE_JOB" "${train_flags[@]}"

  submit_stage export EXPORT_JOB export.sbatch "$TRAIN_JOB" --time="$INFIFPO_EXPORT_TIME"

  if [ "$INFIFPO_EVAL" = 1 ]; then
    local eval_flags=(--time="$INFIFPO_EVAL_TIME")
    [ "$INFIFPO_EVAL_GPUS" -eq 0 ] || eval_flags+=(--gpus-per-node="$INFIFPO_EVAL_GPUS")
    [ -z "$INFIFPO_CPUS_PER_TASK" ] || eval_flags+=(--cpus-per-task="$INFIFPO_CPUS_PER_TASK")
    submit_stage eval EVAL_JOB evaluate.sbatch "$EXPORT_JOB" "${eval_flags[@]}"
  fi

  if [ "$INFIFPO_DRY_RUN" != 1 ]; then
    infifpo_refresh_pipeline_json
    infifpo_log "pipeline.json: ${INFIFPO_OUT}/pipeline.json"
  fi
  # One machine-readable line per stage on stdout (the job id, or "complete").
  printf 'score=%s merge=%s train=%s export=%s eval=%s\n' "${SCORE_JOB:-complete}" "${MERGE_JOB:-complete}" \
    "${TRAIN_JOB:-complete}" "${EXPORT_JOB:-complete}" "$([ "$INFIFPO_EVAL" = 1 ] && printf '%s' "${EVAL_JOB:-complete}" || printf off)" |
    if infifpo_prompts_mode; then
      sed "s/\$/ generate=${GENERATE_JOB:-complete} judge=${JUDGE_JOB:-complete} pairs=${PAIRS_JOB:-complete} sft=${SFT_JOB:-complete} sft_export=${SFT_EXPORT_JOB:-complete}/"
    else
      cat
    fi
}

cmd_status() {
  infifpo_load_settings
  [ -f "$INFIFPO_MODELS_TSV" ] || infifpo_die "no pipeline in ${INFIFPO_OUT} (no models.tsv)"
  ! infifpo_prompts_mode || [ ! -f "$INFIFPO_GENERATE_TSV" ] || infifpo_prompt_eval_default
  infifpo_refresh_pipeline_json
  cat "${INFIFPO_OUT}/pipeline.json"
  if [ "$INFIFPO_EVAL" = 1 ]; then
    if [ -f "${INFIFPO_EVAL_DIR}/summary.md" ]; then
      infifpo_log "evaluation summary: ${INFIFPO_EVAL_DIR}/summary.md"
    else
      infifpo_log "evaluation summary (not written yet): ${INFIFPO_EVAL_DIR}/summary.md"
    fi
  fi
}

case "${1:-}" in
  "") cmd_submit ;;
  --status) cmd_status ;;
  -h | --help) sed -n '2,/^#SBATCH/{/^#SBATCH/d;s/^# \{0,1\}//;p}' "${INFIFPO_REPO}/slurm/train_phi4.sh" ;;
  *)
    echo "usage: [sbatch|bash] slurm/train_phi4.sh [--status|--help]" >&2
    exit 2
    ;;
esac
