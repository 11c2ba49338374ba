#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for CI and local tests of the slurm/ scripts.
#
#   slurm/local_cluster.sh up       install (apt) if missing, start munged/slurmctld/slurmd,
#                                   wait until the node is idle; prints the SLURM_CONF export
#   slurm/local_cluster.sh down     stop the daemons this script started (pid files)
#   slurm/local_cluster.sh status   daemons, node state, queue
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` (eval "$(... env)")
#
# Works as root without systemd (containers, CI VMs). Everything it writes lives under
# INFIFPO_SLURM_HOME (config, state, spool, logs, pid files) except the munge key, which
# munge only reads from /etc/munge. The configuration is NOT written to /etc/slurm: client
# commands find it through SLURM_CONF, so an existing Slurm set-up on the machine is never
# overwritten. `up` is idempotent.
#
# Settings (environment):
#   INFIFPO_SLURM_HOME   private directory                      (default /tmp/infifpo-slurm)
#   INFIFPO_SLURM_CPUS   CPUs the node advertises               (default max(real CPUs, 4):
#                        tests run more tasks than a 2-core CI machine has; slurmd accepts
#                        the overstatement thanks to SlurmdParameters=config_overrides)
#   INFIFPO_SLURM_TIMEOUT  seconds to wait for an idle node     (default 120)
set -euo pipefail

SLURM_HOME_DIR="${INFIFPO_SLURM_HOME:-/tmp/infifpo-slurm}"
CONF_FILE="${SLURM_HOME_DIR}/etc/slurm.conf"
RUN_DIR="${SLURM_HOME_DIR}/run"
LOG_DIR="${SLURM_HOME_DIR}/log"
MUNGE_KEY=/etc/munge/munge.key
TIMEOUT="${INFIFPO_SLURM_TIMEOUT:-120}"

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts munged/slurmd as root)"
}

short_host() { hostname -s; }

# ------------------------------------------------------------------ installation

have_binaries() {
  command -v munged >/dev/null && command -v slurmctld >/dev/null &&
    command -v slurmd >/dev/null && command -v sbatch >/dev/null
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is unavailable"
  log "installing slurm-wlm and munge with apt-get"
  # Debian post-install scripts would start the daemons (with their own configuration);
  # a policy-rc.d that answers 101 ("action forbidden") stops that. Only remove it if we
  # created it.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created_policy=1
  fi
  local rc=0
  (
    export DEBIAN_FRONTEND=noninteractive
    # Fresh machines often have empty or stale package lists: update only when needed.
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; then
      apt-get update -q >/dev/null
      apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
    fi
  ) || rc=$?
  if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || die "apt-get install slurm-wlm munge failed (exit $rc)"
  have_binaries || die "slurm binaries still missing after installation"
}

# ------------------------------------------------------------------ configuration

ensure_hostname_resolves() {
  # slurmctld and slurmd look the node up by its short name.
  local host
  host="$(short_host)"
  if ! getent hosts "$host" >/dev/null; then
    log "adding ${host} to /etc/hosts"
    printf '127.0.0.1 %s\n' "$host" >>/etc/hosts
  fi
}

ensure_munge_key() {
  if [ ! -s "$MUNGE_KEY" ]; then
    log "creating ${MUNGE_KEY}"
    mkdir -p "$(dirname "$MUNGE_KEY")"
    dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
  fi
  # munged refuses keys readable by others, and directories it does not trust.
  chmod 0700 "$(dirname "$MUNGE_KEY")"
  chmod 0400 "$MUNGE_KEY"
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  chmod 0700 /var/lib/munge /var/log/munge
}

# The node line slurmd detects (CPUs, sockets, cores, threads, memory), or a plain
# CPUs=/RealMemory= line when the CPU count is overridden (a detailed topology would
# have to agree with the new count).
node_line() {
  local detected real_cpus cpus mem
  detected="$(slurmd -C | head -n 1)"
  real_cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")"
  cpus="${INFIFPO_SLURM_CPUS:-$((real_cpus > 4 ? real_cpus : 4))}"
  if [ "$cpus" = "$real_cpus" ]; then
    printf '%s\n' "$detected"
  else
    printf 'NodeName=%s CPUs=%s RealMemory=%s\n' "$(short_host)" "$cpus" "$mem"
  fi
}

write_config() {
  mkdir -p "${SLURM_HOME_DIR}/etc" "${SLURM_HOME_DIR}/state" "${SLURM_HOME_DIR}/spool" \
    "$RUN_DIR" "$LOG_DIR"
  local tmp="${CONF_FILE}.tmp.$$"
  cat >"$tmp" <<EOF
# Written by slurm/local_cluster.sh: single-node test cluster, no systemd, no accounting.
ClusterName=infifpo
SlurmctldHost=$(short_host)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire seconds (default 120); 10 keeps the
# pre-emption tests short.
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
StateSaveLocation=${SLURM_HOME_DIR}/state
SlurmdSpoolDir=${SLURM_HOME_DIR}/spool
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
# No cgroups without systemd: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.txt
SchedulerType=sched/backfill
# Start batch jobs at once instead of batching them (saves ~3 s per job); run the scheduler
# every few seconds (default 60) so a requeued job starts soon after it becomes eligible.
SchedulerParameters=batch_sched_delay=0,sched_interval=3,bf_interval=3
# A dependency that can never be satisfied (failed afterok) cancels the dependent job
# instead of leaving it pending forever. Only valid here, not under SchedulerParameters.
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Keep finished jobs visible to scontrol show job (start/end times) for an hour.
MinJobAge=3600
# Let the node advertise the CPUs written below even if it has fewer.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
$(node_line) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv -f "$tmp" "$CONF_FILE"
}

# ------------------------------------------------------------------ daemons

pid_alive() {
  local pidfile="$1" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
  if munge_works; then return 0; fi
  ensure_munge_key
  log "starting munged"
  # --force: run even if /run/munge or the key's owner look unusual for a container.
  munged --force --pid-file="${RUN_DIR}/munged.pid" --log-file="${LOG_DIR}/munged.log"
  for _ in $(seq 1 50); do
    munge_works && return 0
    sleep 0.1
  done
  die "munged did not come up"
}

start_slurmctld() {
  if pid_alive "${RUN_DIR}/slurmctld.pid"; then return 0; fi
  log "starting slurmctld"
  slurmctld -f "$CONF_FILE"
}

start_slurmd() {
  if pid_alive "${RUN_DIR}/slurmd.pid"; then return 0; fi
  log "starting slurmd"
  slurmd -f "$CONF_FILE"
}

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n 1; }

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) state resumed=0
  while [ "$SECONDS" -lt "$deadline" ]; do
    state="$(node_state || true)"
    case "$state" in
      idle | mix | alloc) return 0 ;;
      down* | drain* | drng*)
        # A node left down/drained by an earlier run (e.g. unexpected reboot): resume it once.
        if [ "$resumed" -eq 0 ]; then
          scontrol update NodeName="$(short_host)" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi
        ;;
    esac
    sleep 0.5
  done
  die "node not idle after ${TIMEOUT}s (state: ${state:-unknown}); see ${LOG_DIR}/"
}

cmd_up() {
  need_root
  install_packages
  ensure_hostname_resolves
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  export SLURM_CONF="$CONF_FILE"
  # Rewrite the configuration only while the daemons are down: a running cluster keeps
  # the file it was started with (up stays idempotent).
  if ! pid_alive "${RUN_DIR}/slurmctld.pid" && ! pid_alive "${RUN_DIR}/slurmd.pid"; then
    write_config
  fi
  start_munge
  start_slurmctld
  start_slurmd
  wait_idle
  log "node $(short_host) is $(node_state)"
  printf 'export SLURM_CONF=%s\n' "$CONF_FILE"
}

stop_pidfile() {
  local name="$1" pidfile="${RUN_DIR}/$1.pid" pid
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile"
    return 0
  fi
  pid="$(cat "$pidfile")"
  log "stopping ${name} (pid ${pid})"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "${name} ignored SIGTERM; killing"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}

cmd_down() {
  # Only daemons with a pid file in our private directory: a munged that was running
  # before `up` (no pid file of ours) is left alone.
  stop_pidfile slurmd
  stop_pidfile slurmctld
  stop_pidfile munged
}

cmd_status() {
  export SLURM_CONF="$CONF_FILE"
  local name rc=0
  for name in munged slurmctld slurmd; do
    if pid_alive "${RUN_DIR}/${name}.pid"; then
      printf '%-10s running (pid %s)\n' "$name" "$(cat "${RUN_DIR}/${name}.pid")"
    else
      printf '%-10s not running (from here)\n' "$name"
      [ "$name" = munged ] && munge_works && printf '%-10s (another munged answers)\n' ""
      [ "$name" = munged ] || rc=1
    fi
  done
  if [ -f "$CONF_FILE" ] && [ "$rc" -eq 0 ]; then
    sinfo -N || rc=1
    squeue || rc=1
  fi
  printf 'export SLURM_CONF=%s\n' "$CONF_FILE"
  return "$rc"
}

main() {
  case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) printf 'export SLURM_CONF=%s\n' "$CONF_FILE" ;;
    *)
      printf 'usage: %s up|down|status|env\n' "$0" >&2
      exit 2
      ;;
  esac
}

main "$@"
