#!/usr/bin/env bash
# A Slurm cluster on this machine, for CI and local tests of the slurm/ scripts: one node by
# default, or several nodes, each in its own network namespace.
#
#   slurm/local_cluster.sh up [--nodes N]   install (apt) if missing, start munged/slurmctld and
#                                   the slurmd(s), wait until every node is idle; prints the
#                                   SLURM_CONF export
#   slurm/local_cluster.sh down     stop the daemons this script started (pid files) and remove
#                                   the namespaces, links and files it created
#   slurm/local_cluster.sh status   daemons, node state, queue
#   slurm/local_cluster.sh env      print `export SLURM_CONF=...` (eval "$(... env)")
#
# Works as root without systemd (containers, CI VMs). Everything it writes lives under
# INFIFPO_SLURM_HOME (config, state, spool, logs, pid files) except the munge key, which
# munge only reads from /etc/munge, and (several nodes) /etc/netns/<namespace>/hosts. The
# configuration is NOT written to /etc/slurm: client commands find it through SLURM_CONF, so
# an existing Slurm set-up on the machine is never overwritten. `up` is idempotent.
#
# Several nodes (--nodes N, N >= 2) behave like separate hosts on a private network: node<i>
# runs its slurmd in network namespace infifpo<port>-node<i> (veth "eth0", address
# <subnet>.<i+1>) and in its own UTS namespace (hostname node<i>), with /etc/hosts naming
# every node there; slurmctld stays in this namespace, on bridge ifp<port>br (<subnet>.1),
# so client commands work from here. Each node has its own spool directory, pid and log
# file; all share the munge key, a private munged (its own socket, nothing else's) and the
# filesystem, which plays the shared filesystem. No traffic leaves the bridge.
#
# Settings (environment):
#   INFIFPO_SLURM_HOME   private directory                      (default /tmp/infifpo-slurm)
#   INFIFPO_SLURM_NODES  nodes, same as --nodes                 (default 1)
#   INFIFPO_SLURM_PORT   slurmctld port; slurmd gets the next one (default 6817, Slurm's).
#                        Give each cluster that runs at the same time its own.
#   INFIFPO_SLURM_SUBNET first three octets of the nodes' /24   (default 10.213.<port % 256>;
#                        several nodes only; must be unused on this machine)
#   INFIFPO_SLURM_CPUS   CPUs each node advertises              (default max(real CPUs, 4):
#                        tests run more tasks than a 2-core CI machine has; slurmd accepts
#                        the overstatement thanks to SlurmdParameters=config_overrides)
#   INFIFPO_SLURM_TIMEOUT  seconds to wait for idle nodes       (default 120)
set -euo pipefail

SLURM_HOME_DIR="${INFIFPO_SLURM_HOME:-/tmp/infifpo-slurm}"
CONF_FILE="${SLURM_HOME_DIR}/etc/slurm.conf"
RUN_DIR="${SLURM_HOME_DIR}/run"
LOG_DIR="${SLURM_HOME_DIR}/log"
MUNGE_KEY=/etc/munge/munge.key
TIMEOUT="${INFIFPO_SLURM_TIMEOUT:-120}"
# Empty: the running cluster's node count, else 1.
NODES="${INFIFPO_SLURM_NODES:-}"
PORT="${INFIFPO_SLURM_PORT:-6817}"
if ! [[ "$PORT" =~ ^[0-9]{4,5}$ ]] || [ "$PORT" -ge 65535 ]; then
  printf '[local_cluster] error: INFIFPO_SLURM_PORT must be a port in 1000..65534, got %s\n' "$PORT" >&2
  exit 1
fi
# What a running cluster was started with (node count): down/status/env follow it.
LAYOUT_FILE="${RUN_DIR}/layout"
# Namespaces, links and files `up` created (one "kind name" per line), for `down`.
CREATED_FILE="${RUN_DIR}/created"
SUBNET="${INFIFPO_SLURM_SUBNET:-10.213.$((PORT % 256))}"
# Several nodes: the cluster's own munged listens here.
MUNGE_SOCKET="${RUN_DIR}/munge/munge.socket"

log() { printf '[local_cluster] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

need_root() {
  [ "$(id -u)" -eq 0 ] || die "must run as root (installs packages, starts munged/slurmd as root)"
}

short_host() { hostname -s; }

# ------------------------------------------------------------------ installation

have_binaries() {
  command -v munged >/dev/null && command -v slurmctld >/dev/null &&
    command -v slurmd >/dev/null && command -v sbatch >/dev/null &&
    { ! multi_node || command -v ip >/dev/null; }
}

install_packages() {
  have_binaries && return 0
  command -v apt-get >/dev/null || die "slurm is not installed and apt-get is unavailable"
  local packages=(slurm-wlm munge)
  # Several nodes need iproute2 (ip netns, veth, bridge); minimal images lack it.
  if multi_node; then packages+=(iproute2); fi
  log "installing ${packages[*]} with apt-get"
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
    if ! apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; then
      apt-get update -q >/dev/null
      apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
    fi
  ) || rc=$?
  if [ "$created_policy" -eq 1 ]; then rm -f "$policy"; fi
  [ "$rc" -eq 0 ] || die "apt-get install ${packages[*]} failed (exit $rc)"
  have_binaries || die "slurm binaries (or ip) still missing after installation"
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
# have to agree with the new count). Several nodes: one line per node, each with its
# namespace address and the same CPUs/memory.
node_lines() {
  local detected real_cpus cpus mem i
  detected="$(slurmd -C | head -n 1)"
  real_cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$detected")"
  mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$detected")"
  cpus="${INFIFPO_SLURM_CPUS:-$((real_cpus > 4 ? real_cpus : 4))}"
  if multi_node; then
    for ((i = 1; i <= NODES; i++)); do
      printf 'NodeName=%s NodeAddr=%s CPUs=%s RealMemory=%s State=UNKNOWN\n' \
        "$(node_name "$i")" "$(node_addr "$i")" "$cpus" "$mem"
    done
  elif [ "$cpus" = "$real_cpus" ]; then
    printf '%s State=UNKNOWN\n' "$detected"
  else
    printf 'NodeName=%s CPUs=%s RealMemory=%s State=UNKNOWN\n' "$(short_host)" "$cpus" "$mem"
  fi
}

write_config() {
  mkdir -p "${SLURM_HOME_DIR}/etc" "${SLURM_HOME_DIR}/state" "${SLURM_HOME_DIR}/spool" \
    "$RUN_DIR" "$LOG_DIR"
  local tmp="${CONF_FILE}.tmp.$$" ctld_host auth spool slurmd_pid slurmd_log i
  # A requeued job may start again only after cred_expire seconds (default 120); 10 keeps the
  # pre-emption tests short.
  auth="cred_expire=10"
  ctld_host="$(short_host)"
  spool="${SLURM_HOME_DIR}/spool"
  slurmd_pid="${RUN_DIR}/slurmd.pid"
  slurmd_log="${LOG_DIR}/slurmd.log"
  if multi_node; then
    # Nodes reach slurmctld at the bridge's address; each node keeps its own spool, pid and
    # log (%n = node name); everything authenticates through the private munged.
    ctld_host="${ctld_host}(${SUBNET}.1)"
    auth="${auth},socket=${MUNGE_SOCKET}"
    spool="${SLURM_HOME_DIR}/spool/%n"
    slurmd_pid="${RUN_DIR}/slurmd-%n.pid"
    slurmd_log="${LOG_DIR}/slurmd-%n.log"
    for ((i = 1; i <= NODES; i++)); do mkdir -p "${SLURM_HOME_DIR}/spool/$(node_name "$i")"; done
  fi
  cat >"$tmp" <<EOC
# Written by slurm/local_cluster.sh: ${NODES}-node test cluster, no systemd, no accounting.
ClusterName=infifpo
SlurmctldHost=${ctld_host}
SlurmctldPort=${PORT}
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=${auth}
MpiDefault=none
MailProg=/bin/true
SwitchType=switch/none
StateSaveLocation=${SLURM_HOME_DIR}/state
SlurmdSpoolDir=${spool}
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${slurmd_pid}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${slurmd_log}
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
# Let the nodes advertise the CPUs written below even if they have fewer.
SlurmdParameters=config_overrides
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
$(node_lines)
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOC
  mv -f "$tmp" "$CONF_FILE"
  printf 'nodes=%s port=%s subnet=%s\n' "$NODES" "$PORT" "$SUBNET" >"$LAYOUT_FILE"
}

# ------------------------------------------------------------------ network (several nodes)

multi_node() { [ "$NODES" -gt 1 ]; }
node_name() { printf 'node%s' "$1"; }
node_addr() { printf '%s.%s' "$SUBNET" "$(($1 + 1))"; }
node_netns() { printf 'infifpo%s-node%s' "$PORT" "$1"; }
# Interface names have at most 15 characters: ifp<port>n<i> (+ "p" for the peer until it is
# renamed eth0 inside the namespace).
node_veth() { printf 'ifp%sn%s' "$PORT" "$1"; }
bridge_name() { printf 'ifp%sbr' "$PORT"; }

record_created() { printf '%s %s\n' "$1" "$2" >>"$CREATED_FILE"; }
was_created() { [ -f "$CREATED_FILE" ] && grep -qxF "$1 $2" "$CREATED_FILE"; }
netns_exists() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

# The bridge (slurmctld's side, <subnet>.1) and per node a namespace with a veth pair into
# it, lo up, and an /etc/hosts (/etc/netns/<ns>/hosts, where `ip netns exec` finds it too) that
# names slurmctld's host and every node (mounted over /etc/hosts in the node's mount
# namespace). Creates only what is missing; refuses to adopt a
# bridge or namespace it did not create.
net_up() {
  command -v ip >/dev/null || die "several nodes need iproute2 (ip netns, veth, bridge)"
  if ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null; then die "several nodes need unshare and nsenter (util-linux)"; fi
  local bridge ns veth i used hosts
  bridge="$(bridge_name)"
  [[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "INFIFPO_SLURM_SUBNET must be three octets (a.b.c), got '${SUBNET}'"
  used="$(ip -4 -o addr show | awk -v p="${SUBNET}." -v br="$bridge" '$2 != br && index($4, p) == 1 {print $2}')"
  used+="$(ip -4 route show | awk -v p="${SUBNET}." -v br="$bridge" 'index($1, p) == 1 && $0 !~ ("dev " br " ") {print " route " $1}')"
  [ -z "$used" ] || die "${SUBNET}.0/24 is already in use here (${used//$'\n'/ }): set INFIFPO_SLURM_SUBNET or INFIFPO_SLURM_PORT"
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    record_created link "$bridge"
    ip addr add "${SUBNET}.1/24" dev "$bridge"
  elif ! was_created link "$bridge"; then
    die "a bridge ${bridge} exists that this cluster did not create: set INFIFPO_SLURM_PORT"
  fi
  ip link set "$bridge" up
  hosts="127.0.0.1 localhost"$'\n'"${SUBNET}.1 $(short_host)"
  for ((i = 1; i <= NODES; i++)); do hosts+=$'\n'"$(node_addr "$i") $(node_name "$i")"; done
  for ((i = 1; i <= NODES; i++)); do
    ns="$(node_netns "$i")" veth="$(node_veth "$i")"
    if ! netns_exists "$ns"; then
      ip netns add "$ns"
      record_created netns "$ns"
    elif ! was_created netns "$ns"; then
      die "a network namespace ${ns} exists that this cluster did not create: set INFIFPO_SLURM_PORT"
    fi
    if [ ! -d "/etc/netns/${ns}" ]; then
      mkdir -p "/etc/netns/${ns}"
      record_created dir "/etc/netns/${ns}"
    fi
    printf '%s\n' "$hosts" >"/etc/netns/${ns}/hosts"
    if ! ip link show "$veth" >/dev/null 2>&1; then
      ip link add "$veth" type veth peer name "${veth}p"
      record_created link "$veth"
      ip link set "${veth}p" netns "$ns"
      ip -n "$ns" link set "${veth}p" name eth0
      ip -n "$ns" addr add "$(node_addr "$i")/24" dev eth0
      ip link set "$veth" master "$bridge"
    fi
    ip link set "$veth" up
    ip -n "$ns" link set lo up
    ip -n "$ns" link set eth0 up
  done
}

# Undo net_up in reverse order: whatever still runs inside a namespace was started there by
# this cluster's slurmd (job steps); it is stopped before the namespace goes.
net_down() {
  [ -f "$CREATED_FILE" ] || return 0
  local kind name pids
  while read -r kind name; do
    case "$kind" in
      netns)
        if netns_exists "$name"; then
          pids="$(ip netns pids "$name" 2>/dev/null | tr '\n' ' ')"
          if [ -n "${pids// /}" ]; then
            log "stopping processes left in ${name}: ${pids}"
            # shellcheck disable=SC2086  # a list of pids
            kill -TERM $pids 2>/dev/null || true
            sleep 1
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
          fi
          log "removing network namespace ${name}"
          ip netns del "$name" || log "could not remove network namespace ${name}"
        fi
        ;;
      link) ! ip link show "$name" >/dev/null 2>&1 || ip link del "$name" || log "could not remove link ${name}" ;;
      dir) [[ "$name" == /etc/netns/* ]] && rm -rf -- "$name" ;;
    esac
  done < <(tac "$CREATED_FILE")
  rm -f "$CREATED_FILE"
}

# ------------------------------------------------------------------ daemons

pid_alive() {
  local pidfile="$1" pid
  [ -s "$pidfile" ] || return 1
  pid="$(cat "$pidfile")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

munge_works() { munge "$@" -n </dev/null 2>/dev/null | unmunge "$@" >/dev/null 2>&1; }

start_munge() {
  if multi_node; then
    start_private_munge
    return 0
  fi
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

# Several nodes: a munged of this cluster's own (same key, its own socket), so that no
# other cluster's `down` can take authentication away from this one, nor this one's from
# another.
start_private_munge() {
  if pid_alive "${RUN_DIR}/munged.pid" && munge_works -S "$MUNGE_SOCKET"; then return 0; fi
  ensure_munge_key
  mkdir -p "$(dirname "$MUNGE_SOCKET")"
  chmod 0755 "$(dirname "$MUNGE_SOCKET")"
  log "starting munged (socket ${MUNGE_SOCKET})"
  munged --force --socket="$MUNGE_SOCKET" --pid-file="${RUN_DIR}/munged.pid" \
    --log-file="${LOG_DIR}/munged.log" --seed-file="$(dirname "$MUNGE_SOCKET")/munged.seed"
  for _ in $(seq 1 50); do
    munge_works -S "$MUNGE_SOCKET" && return 0
    sleep 0.1
  done
  die "munged did not come up (see ${LOG_DIR}/munged.log)"
}

start_slurmctld() {
  if pid_alive "${RUN_DIR}/slurmctld.pid"; then return 0; fi
  log "starting slurmctld"
  slurmctld -f "$CONF_FILE"
}

start_slurmd() {
  local i name
  if ! multi_node; then
    if pid_alive "${RUN_DIR}/slurmd.pid"; then return 0; fi
    log "starting slurmd"
    slurmd -f "$CONF_FILE"
    return 0
  fi
  for ((i = 1; i <= NODES; i++)); do
    name="$(node_name "$i")"
    pid_alive "${RUN_DIR}/slurmd-${name}.pid" && continue
    log "starting slurmd ${name} ($(node_addr "$i"), namespace $(node_netns "$i"))"
    # Into the node's network namespace, plus its own UTS namespace (the hostname is the node
    # name, as on a real cluster: slurmd finds its NodeName from it, jobs see it) and mount
    # namespace (its /etc/hosts). Not `ip netns exec`: that remounts /sys without the cgroup
    # filesystem, and slurmd refuses to start without it.
    # shellcheck disable=SC2016  # expanded by the inner sh
    nsenter --net="/run/netns/$(node_netns "$i")" unshare --uts --mount --propagation private \
      sh -c 'mount --bind "$3" /etc/hosts && hostname "$1" && exec slurmd -f "$2"' \
      sh "$name" "$CONF_FILE" "/etc/netns/$(node_netns "$i")/hosts"
  done
}

# "name state" per node.
node_states() { sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) states ready name state
  local -A resumed=()
  while [ "$SECONDS" -lt "$deadline" ]; do
    states="$(node_states || true)"
    ready=0
    while read -r name state; do
      [ -n "$name" ] || continue
      case "$state" in
        idle | mix | alloc) ready=$((ready + 1)) ;;
        down* | drain* | drng*)
          # A node left down/drained by an earlier run (e.g. unexpected reboot): resume it once.
          if [ -z "${resumed[$name]:-}" ]; then
            scontrol update NodeName="$name" State=RESUME >/dev/null 2>&1 || true
            resumed[$name]=1
          fi
          ;;
      esac
    done <<<"$states"
    [ "$ready" -lt "$NODES" ] || return 0
    sleep 0.5
  done
  die "nodes not idle after ${TIMEOUT}s (${states//$'\n'/, }); see ${LOG_DIR}/"
}

# The node count of the cluster whose daemons run from this directory, if any.
running_nodes() {
  pid_alive "${RUN_DIR}/slurmctld.pid" || return 0
  [ -f "$LAYOUT_FILE" ] || { printf '1'; return 0; }
  sed -n 's/^nodes=\([0-9]*\).*/\1/p' "$LAYOUT_FILE"
}

cmd_up() {
  need_root
  [[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "--nodes must be between 1 and 99, got '${NODES}'"
  local running
  running="$(running_nodes)"
  [ -z "$running" ] || [ "$running" = "$NODES" ] ||
    die "a ${running}-node cluster is running from ${SLURM_HOME_DIR}: run \`$0 down\` first, or use another INFIFPO_SLURM_HOME"
  install_packages
  ensure_hostname_resolves
  mkdir -p "$RUN_DIR" "$LOG_DIR"
  export SLURM_CONF="$CONF_FILE"
  # Rewrite the configuration only while the daemons are down: a running cluster keeps
  # the file it was started with (up stays idempotent).
  if ! pid_alive "${RUN_DIR}/slurmctld.pid" && [ -z "$(running_slurmds)" ]; then
    write_config
  fi
  if multi_node; then net_up; fi
  start_munge
  start_slurmctld
  start_slurmd
  wait_idle
  log "$(node_states | awk '{printf "%snode %s is %s", (NR > 1 ? ", " : ""), $1, $2}')"
  printf 'export SLURM_CONF=%s\n' "$CONF_FILE"
}

# The pid files of running slurmd's of this cluster (one, or one per node).
running_slurmds() {
  local pidfile
  for pidfile in "${RUN_DIR}"/slurmd.pid "${RUN_DIR}"/slurmd-*.pid; do
    if pid_alive "$pidfile"; then printf '%s\n' "$pidfile"; fi
  done
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
  local pidfile
  for pidfile in "${RUN_DIR}"/slurmd.pid "${RUN_DIR}"/slurmd-*.pid; do
    [ -e "$pidfile" ] || continue
    stop_pidfile "$(basename "$pidfile" .pid)"
  done
  stop_pidfile slurmctld
  stop_pidfile munged
  net_down
  rm -f "$LAYOUT_FILE"
}

cmd_status() {
  export SLURM_CONF="$CONF_FILE"
  local name rc=0 i
  local names=(munged slurmctld)
  if multi_node; then
    for ((i = 1; i <= NODES; i++)); do names+=("slurmd-$(node_name "$i")"); done
  else
    names+=(slurmd)
  fi
  for name in "${names[@]}"; do
    if pid_alive "${RUN_DIR}/${name}.pid"; then
      printf '%-13s running (pid %s)\n' "$name" "$(cat "${RUN_DIR}/${name}.pid")"
    else
      printf '%-13s not running (from here)\n' "$name"
      [ "$name" = munged ] && ! multi_node && munge_works && printf '%-13s (another munged answers)\n' ""
      [ "$name" = munged ] && ! multi_node || rc=1
    fi
  done
  if multi_node; then
    for ((i = 1; i <= NODES; i++)); do
      netns_exists "$(node_netns "$i")" || { printf 'namespace %s missing\n' "$(node_netns "$i")"; rc=1; }
    done
  fi
  if [ -f "$CONF_FILE" ] && [ "$rc" -eq 0 ]; then
    sinfo -N || rc=1
    squeue || rc=1
  fi
  printf 'export SLURM_CONF=%s\n' "$CONF_FILE"
  return "$rc"
}

main() {
  local cmd="${1:-}"
  [ "$#" -eq 0 ] || shift
  while [ "$#" -gt 0 ]; do
    case "$1" in
      --nodes) [ "$#" -ge 2 ] || die "--nodes needs a number"; NODES="$2"; shift 2 ;;
      --nodes=*) NODES="${1#--nodes=}"; shift ;;
      *) die "unknown option '$1'" ;;
    esac
  done
  # A running cluster keeps its layout: down/status/env (and `up` without --nodes) follow it.
  if [ -f "$LAYOUT_FILE" ] && { [ "$cmd" != up ] || [ -z "$NODES" ]; }; then
    NODES="$(sed -n 's/^nodes=\([0-9]*\).*/\1/p' "$LAYOUT_FILE")"
    PORT="$(sed -n 's/.* port=\([0-9]*\).*/\1/p' "$LAYOUT_FILE")"
    SUBNET="$(sed -n 's/.* subnet=\([0-9.]*\).*/\1/p' "$LAYOUT_FILE")"
  fi
  : "${NODES:=1}"
  case "$cmd" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) printf 'export SLURM_CONF=%s\n' "$CONF_FILE" ;;
    *)
      printf 'usage: %s up [--nodes N]|down|status|env\n' "$0" >&2
      exit 2
      ;;
  esac
}

main "$@"
