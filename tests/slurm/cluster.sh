#!/usr/bin/env bash
# A real 2-node SLURM cluster (nodes n1 and n2, slurmdbd accounting) on this one machine, for the tests.
#   cluster.sh up      install packages if missing, choose free ports, write config, start daemons (idempotent)
#   cluster.sh down    stop exactly the daemons this state dir started, after cancelling its jobs (idempotent)
#   cluster.sh status  daemons and nodes; exit 0 only if n1 and n2 are both up (idle or running jobs)
#   cluster.sh env     shell lines that point client commands at this cluster: eval "$(cluster.sh env)"
#
# Everything lives in the state dir: $RUNNER_SLURM_DIR, default /tmp/runner-slurm-<checkout>-<hash of its path>,
# so two checkouts get two clusters. Config is $STATE/etc/slurm.conf, found by every client through SLURM_CONF
# (never /etc/slurm/slurm.conf); ports are chosen free at `up` and recorded in $STATE/ports; munged serves its
# own socket in $STATE/munge; MariaDB has its own datadir and socket. A daemon counts as ours only if its pid
# is in our pid file, its command name is right and its command line or environment names our state dir:
# another cluster on the machine (e.g. one on the default ports and /etc/slurm) is never touched.
#
# The two nodes share 127.0.0.1 (loopback only): each slurmd runs in its own UTS + mount namespace, with its
# own hostname and a private /etc/hosts naming n1 and n2; its jobs inherit both. slurmctld runs in one too
# (hostname ctld), so nothing on the machine needs to resolve a name for this cluster.
# See /work/shared/notes/slurm.md and scale.md for why each setting is there.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)"
STATE="${RUNNER_SLURM_DIR:-/tmp/runner-slurm-$(basename "$REPO")-$(printf %s "$REPO" | cksum | cut -d' ' -f1)}"
CONF_DIR="$STATE/etc"
CONF="$CONF_DIR/slurm.conf"
PORTS="$STATE/ports"
HOSTS="$STATE/hosts"
RUN="$STATE/run"
LOGS="$STATE/log"
DB_DIR="$STATE/mysql"
DB_SOCK="$DB_DIR/mysqld.sock"
MUNGE_DIR="$STATE/munge"
MUNGE_SOCK="$MUNGE_DIR/munge.socket"
NODES=(n1 n2)
PACKAGES=(slurm-wlm munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd.n1 slurmd.n2)   # start order
TIMEOUT="${RUNNER_SLURM_TIMEOUT:-60}"
# Every client command below (sinfo, sacct, scancel...) talks to this cluster, whatever the caller had set.
export SLURM_CONF="$CONF"
# slurmdbd reaches MariaDB through this socket.
export MYSQL_UNIX_PORT="$DB_SOCK"
STARTED=()   # daemons started by this invocation: what a failed `up` stops again

log() { printf "cluster.sh: %s %s\n" "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

comm_of() { echo "${1%%.*}"; }   # slurmd.n1 -> slurmd
# munged runs as user munge and insists on owning its pid and log files, so they live in its own dir.
pidfile() { if [[ $1 == munged ]]; then echo "$MUNGE_DIR/munged.pid"; else echo "$RUN/$1.pid"; fi; }
logfile() { if [[ $1 == munged ]]; then echo "$MUNGE_DIR/munged.log"; else echo "$LOGS/$1.log"; fi; }

# PID 1 here reaps orphans only every few seconds, so a dead daemon lingers as a zombie: not alive.
alive() { local st; st="$(ps -o stat= -p "$1" 2>/dev/null)" && [[ $st != Z* ]]; }

# Prints the pid of daemon $1 if this state dir started it and it still runs: the pid file's pid is alive,
# has the daemon's command name, and names "$STATE/" in its command line or environment (so neither a
# recycled pid nor another cluster's daemon of the same name is ever taken for ours).
daemon_pid() {
    local pid
    pid="$(tr -dc '0-9' 2>/dev/null <"$(pidfile "$1")")" || return 1
    [[ -n $pid ]] && alive "$pid" || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$(comm_of "$1")" ]] || return 1
    cat "/proc/$pid/cmdline" "/proc/$pid/environ" 2>/dev/null | tr '\0' '\n' | grep -qF "$STATE/" || return 1
    echo "$pid"
}
running() { daemon_pid "$1" >/dev/null; }

tail_logs() {
    local d
    for d in "$@"; do
        [[ -s "$(logfile "$d")" ]] || continue
        log "---- last lines of $(logfile "$d") ----"
        tail -n 15 "$(logfile "$d")" >&2 || true
    done
}

# wait_for <seconds> <description> <daemons whose logs to show on failure> -- <command...>
# The bound is wall-clock time; each probe below gives its client at most 10 s (T), as a client can hang on
# a daemon that is not up yet.
wait_for() {
    local secs=$1 what=$2 logs=() deadline
    shift 2
    while [[ $1 != -- ]]; do logs+=("$1"); shift; done
    shift
    deadline=$((SECONDS + secs))
    while :; do
        "$@" >/dev/null 2>&1 && return 0
        ((SECONDS < deadline)) || break
        sleep 0.25
    done
    log "timed out after ${secs}s waiting for $what"
    tail_logs "${logs[@]}"
    exit 1
}

install_packages() {
    local p missing=() made_policy=0 rc=0
    for p in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    # NOTE: reinstalling munge under a running munged (ours or anyone's) breaks authentication: refuse.
    if pgrep -x munged >/dev/null; then die "packages missing (${missing[*]}) while a munged runs; install them first"; fi
    log "installing ${missing[*]} (apt-get, quiet)"
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then   # keep package scripts from starting services
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >"$LOGS/apt.log" 2>&1 || rc=$?
    if ((rc == 0)); then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
            >>"$LOGS/apt.log" 2>&1 || rc=$?
    fi
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    ((rc == 0)) || { tail -n 20 "$LOGS/apt.log" >&2; die "apt-get failed (exit $rc)"; }
}

# True if any TCP socket (listening or connected, IPv4 or IPv6) uses local port $1.
port_used() {
    local hex
    hex="$(printf '%04X' "$1")"
    awk -v p=":$hex" 'FNR > 1 && substr($2, length($2) - 4) == p { found = 1 } END { exit !found }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# Four free ports (slurmctld, slurmdbd, slurmd on n1 and n2) in 15000-19999: below the kernel's ephemeral
# range and below runner's per-job rendezvous ports (20000-39999), so neither can take them later.
choose_ports() {
    local name p chosen=" "
    : >"$PORTS.new"
    for name in CTLD_PORT DBD_PORT N1_PORT N2_PORT; do
        while :; do
            p=$((15000 + RANDOM % 5000))
            [[ $chosen != *" $p "* ]] && ! port_used "$p" && break
        done
        chosen+="$p "
        echo "$name=$p" >>"$PORTS.new"
    done
    mv -f "$PORTS.new" "$PORTS"
}

write_configs() {
    local cpus mem
    cpus="$(nproc)"
    mem="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.45)}' /proc/meminfo)"   # each node claims under half
    # shellcheck disable=SC1090
    source "$PORTS"
    { cat /etc/hosts; echo "127.0.0.1 ctld ${NODES[*]}"; } >"$HOSTS"
    cat >"$CONF.new" <<EOF
# generated by runner tests/slurm/cluster.sh (state dir $STATE)
ClusterName=runner
SlurmctldHost=ctld(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$N1_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
KillWait=5
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# NOTE: clients reach slurmdbd with the munge socket named here, not AuthInfo's (else the system default
# /run/munge/munge.socket.2: which works only while some other munged serves it, with the same key).
AccountingStoragePass=$MUNGE_SOCK
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=n1 NodeAddr=127.0.0.1 Port=$N1_PORT CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$N2_PORT CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 OverSubscribe=FORCE:4 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=10 OverSubscribe=EXCLUSIVE PreemptMode=OFF
EOF
    mv -f "$CONF.new" "$CONF"
    cat >"$CONF_DIR/slurmdbd.conf" <<EOF
# generated by runner tests/slurm/cluster.sh (state dir $STATE)
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
CommunicationParameters=NoInAddrAny
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$CONF_DIR/slurmdbd.conf"   # slurmdbd refuses a world-readable config
}

T=(timeout 10)
munge_ok() { "${T[@]}" munge -S "$MUNGE_SOCK" -n 2>/dev/null | "${T[@]}" unmunge -S "$MUNGE_SOCK" >/dev/null 2>&1; }
db_ok() { "${T[@]}" mariadb-admin --no-defaults --socket="$DB_SOCK" --user=root ping; }
dbd_ok() { "${T[@]}" sacctmgr -n list cluster; }
acct_ok() { "${T[@]}" sacct -n -X -S now-1hours; }
# The state of node $1 as sinfo prints it (a trailing * means not responding).
node_state() { "${T[@]}" sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n 1; }
node_up() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated|completing)$ ]]; }
nodes_up() { local n; for n in "${NODES[@]}"; do node_up "$n" || return 1; done; }

# Run "$@" in a UTS + mount namespace of its own, named $1, with our /etc/hosts (n1, n2, ctld -> 127.0.0.1).
in_node() {
    local name=$1
    shift
    unshare --uts --mount --propagation private \
        sh -c 'hostname "$1" && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' sh "$name" "$HOSTS" "$@"
}

start_daemon() {
    local d=$1
    if running "$d"; then return 0; fi
    rm -f "$(pidfile "$d")"
    log "starting $d"
    STARTED+=("$d")
    case $d in
        munged)
            [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (reinstall munge)"
            runuser -u munge -- munged --socket="$MUNGE_SOCK" --pid-file="$(pidfile munged)" \
                --log-file="$(logfile munged)" --seed-file="$MUNGE_DIR/munge.seed" \
                </dev/null >"$LOGS/munged.out" 2>&1 9>&- || { cat "$LOGS/munged.out" >&2; die "munged failed to start"; }
            wait_for 10 "munge authentication on $MUNGE_SOCK" munged -- munge_ok ;;
        mariadbd)
            if [[ ! -d $DB_DIR/data/mysql ]]; then
                log "initialising MariaDB datadir $DB_DIR/data"
                mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=root --skip-test-db \
                    --auth-root-authentication-method=socket >"$LOGS/mariadb-install.log" 2>&1 \
                    || { tail -n 20 "$LOGS/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
            fi
            setsid -f mariadbd --no-defaults --datadir="$DB_DIR/data" --socket="$DB_SOCK" \
                --pid-file="$(pidfile mariadbd)" --log-error="$(logfile mariadbd)" --user=root \
                --skip-networking --innodb-lock-wait-timeout=900 \
                </dev/null >>"$(logfile mariadbd)" 2>&1 9>&-
            wait_for 30 "MariaDB on $DB_SOCK" mariadbd -- db_ok ;;
        slurmdbd)
            slurmdbd </dev/null >>"$(logfile slurmdbd)" 2>&1 9>&- || { tail_logs slurmdbd; die "slurmdbd failed to start"; }
            wait_for 60 "slurmdbd (sacctmgr list cluster)" slurmdbd mariadbd -- dbd_ok ;;
        slurmctld)
            in_node ctld slurmctld -f "$CONF" </dev/null >>"$(logfile "$d")" 2>&1 9>&- \
                || { tail_logs "$d"; die "$d failed to start"; } ;;
        slurmd.*)
            in_node "${d#slurmd.}" slurmd -f "$CONF" -N "${d#slurmd.}" </dev/null >>"$(logfile "$d")" 2>&1 9>&- \
                || { tail_logs "$d"; die "$d failed to start"; } ;;
    esac
    wait_for 10 "$d pid file" "$d" -- running "$d"
}

# On a failed `up`: show the logs, then stop whatever this invocation started (nothing else).
up_failed() {
    local rc=$? i
    trap - EXIT
    if ((rc != 0)); then
        log "up failed (exit $rc); stopping what it started: ${STARTED[*]:-nothing}"
        tail_logs "${DAEMONS[@]}"
        for ((i = ${#STARTED[@]} - 1; i >= 0; i--)); do stop_daemons "${STARTED[i]}"; done
    fi
    exit "$rc"
}

cmd_up() {
    local t0=$SECONDS d any=0
    install -d -m 0755 "$STATE" "$CONF_DIR" "$RUN" "$LOGS" "$STATE/ctld" "$DB_DIR" "${NODES[@]/#/$STATE/slurmd/}"
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    runuser -u munge -- test -w "$MUNGE_DIR" \
        || die "munged runs as user munge and cannot reach $MUNGE_DIR: pick a RUNNER_SLURM_DIR whose parent dirs all can (e.g. under /tmp)"
    install_packages
    for d in "${DAEMONS[@]}"; do if running "$d"; then any=1; fi; done
    # Ports and config are fixed while any daemon of ours runs; otherwise chosen afresh (old ones may be taken).
    if ((any == 0)) || [[ ! -s $PORTS || ! -s $CONF ]]; then
        ((any == 0)) || die "daemons of $STATE run without their config; run 'down' first"
        choose_ports
        write_configs
    fi
    trap up_failed EXIT
    for d in "${DAEMONS[@]}"; do start_daemon "$d"; done
    wait_for "$TIMEOUT" "nodes ${NODES[*]} to be up in sinfo" slurmctld "${DAEMONS[@]:4}" -- nodes_up
    wait_for "$TIMEOUT" "sacct to answer" slurmdbd slurmctld -- acct_ok
    trap - EXIT
    log "cluster up: nodes ${NODES[*]} ($((SECONDS - t0))s); state in $STATE"
    log "clients: eval \"\$(${RUNNER_SLURM_DIR:+RUNNER_SLURM_DIR=$STATE }$0 env)\""
}

# Stop the given daemons of ours at once (TERM, then KILL after 30 s); missing or foreign ones are left alone.
stop_daemons() {
    local d pid i t pids=() names=()
    for d in "$@"; do
        if pid="$(daemon_pid "$d")"; then
            log "stopping $d (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
            names+=("$d")
        fi
        rm -f "$(pidfile "$d")"
    done
    for i in "${!pids[@]}"; do
        for ((t = 0; t < 300; t++)); do alive "${pids[i]}" || break; sleep 0.1; done
        if alive "${pids[i]}"; then
            log "${names[i]} did not exit after 30s; sending SIGKILL"
            kill -KILL "${pids[i]}" 2>/dev/null || true
        fi
    done
}

cmd_down() {
    local i ids
    # Cancel this cluster's jobs first (squeue reads our SLURM_CONF), so no job task outlives its slurmd.
    if running slurmctld; then
        ids="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')" || true
        if [[ -n ${ids// /} ]]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            for ((i = 0; i < 60; i++)); do [[ -n "$(squeue -h -o %A 2>/dev/null)" ]] || break; sleep 0.25; done
        fi
    fi
    stop_daemons slurmd.n2 slurmd.n1 slurmctld   # together: each takes seconds to exit
    stop_daemons slurmdbd
    stop_daemons mariadbd
    stop_daemons munged
    log "cluster down ($STATE)"
}

cmd_status() {
    local d pid n rc=0
    for d in "${DAEMONS[@]}"; do
        if pid="$(daemon_pid "$d")"; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; rc=1; fi
    done
    if running slurmctld; then
        for n in "${NODES[@]}"; do
            echo "node $n: $(node_state "$n" || true)"
            node_up "$n" || rc=1
        done
    fi
    return "$rc"
}

cmd_env() {
    [[ -s $CONF ]] || die "no cluster config in $STATE; run '$0 up' first"
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

main() {
    local cmd="${1:-}"
    case $cmd in
        up|down|status|env) ;;
        *) echo "usage: $0 up|down|status|env   (state dir: \$RUNNER_SLURM_DIR, default $STATE)" >&2; exit 2 ;;
    esac
    if [[ $cmd == env ]]; then cmd_env; return; fi
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    if [[ $cmd != up && ! -d $STATE ]]; then
        [[ $cmd == status ]] && { echo "no cluster in $STATE"; return 1; }
        return 0
    fi
    mkdir -p "$STATE"
    # One lock per state dir, closed (9>&-) for every daemon we start.
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another cluster.sh holds $STATE/.lock"
    "cmd_$cmd"
}

main "$@"
