#!/usr/bin/env bash
# A single-node Slurm cluster on loopback, for the Slurm CI step (.ci/slurm/run-test.sh).
#
#   bash .ci/slurm/cluster.sh up     # start munged, MariaDB, slurmdbd, slurmctld, slurmd
#   bash .ci/slurm/cluster.sh down   # stop what `up` started and put /etc/slurm back
#
# Needs root and Debian's slurm-wlm, slurmdbd, munge and mariadb-server (run-test.sh installs
# them). Everything the cluster writes lives in $SMOE_SLURM_STATE (default /tmp/smoe-slurm):
# configs, MariaDB's data, spool, logs, pid files. The one file outside it is
# /etc/slurm/slurm.conf, where srun inside a job looks for the configuration by default; an
# existing one is moved aside and restored by `down`. A munged that already answers is used
# as it is and left running.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${SMOE_SLURM_STATE:-/tmp/smoe-slurm}"
PARTITION="${SMOE_SLURM_PARTITION:-smoe-ci}"
ACCOUNT="${SMOE_SLURM_ACCOUNT:-smoe-ci}"
CTLD_PORT=6817
SLURMD_PORT=6818
DBD_PORT=6819
DB_PORT="${SMOE_SLURM_DB_PORT:-3316}"
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF="$STATE/etc/slurm.conf"

log() { echo "[slurm-cluster] $*"; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll once a second until COMMAND succeeds.
wait_for() {
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq "$seconds"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  log "timed out after ${seconds}s waiting for $what"
  return 1
}

render() {  # render TEMPLATE OUT
  sed -e "s|@HOST@|$HOST|g" -e "s|@STATE@|$STATE|g" -e "s|@CPUS@|$CPUS|g" \
    -e "s|@CPU_FACTOR@|$CPU_FACTOR|g" -e "s|@MEMORY_MB@|$MEMORY_MB|g" -e "s|@PARTITION@|$PARTITION|g" \
    -e "s|@CTLD_PORT@|$CTLD_PORT|g" -e "s|@SLURMD_PORT@|$SLURMD_PORT|g" \
    -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" "$1" >"$2"
}

munge_answers() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }
node_idle() { sinfo -h -N -o '%T' | grep -qx idle; }
db() { mariadb --no-defaults --protocol=socket --socket="$STATE/mysql.sock" -u root "$@"; }

up() {
  if [ -e "$STATE" ]; then
    log "$STATE exists: run '$0 down' first"
    return 1
  fi
  HOST="$(hostname -s)"
  CPU_FACTOR="${SMOE_SLURM_CPU_FACTOR:-2}"
  CPUS=$(( $(nproc) * CPU_FACTOR ))
  # what slurmd will find, less a margin for the daemons themselves
  MEMORY_MB=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 512 ))
  mkdir -p "$STATE"/{etc,ctld,slurmd,log,mysql}
  render "$HERE/slurm.conf.in" "$STATE/etc/slurm.conf"
  render "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf"
  render "$HERE/gres.conf.in" "$STATE/etc/gres.conf"
  chmod 600 "$STATE/etc/slurmdbd.conf"  # slurmdbd refuses a readable one
  mkdir -p /etc/slurm
  if [ -e "$SYSTEM_CONF" ]; then mv "$SYSTEM_CONF" "$STATE/slurm.conf.system"; fi
  cp "$STATE/etc/slurm.conf" "$SYSTEM_CONF"
  touch "$STATE/installed-system-conf"
  log "node $HOST: $CPUS CPUs ($(nproc) cores x $CPU_FACTOR), $MEMORY_MB MB, partition $PARTITION, state in $STATE"

  if munge_answers; then
    log "munged already running: using it"
  else
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
    wait_for 20 munged munge_answers
  fi

  log "MariaDB on 127.0.0.1:$DB_PORT"
  mariadb-install-db --no-defaults --user=root --datadir="$STATE/mysql" \
    --auth-root-authentication-method=normal --skip-test-db >"$STATE/log/mariadb-install.log" 2>&1
  mariadbd --no-defaults --user=root --datadir="$STATE/mysql" --socket="$STATE/mysql.sock" \
    --bind-address=127.0.0.1 --port="$DB_PORT" --pid-file="$STATE/mariadbd.pid" \
    --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=64M \
    </dev/null >>"$STATE/log/mariadb.log" 2>&1 &
  wait_for 60 MariaDB db -e 'select 1'
  # slurmdbd connects over TCP as root@127.0.0.1
  db -e "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1'; GRANT ALL ON *.* TO 'root'@'127.0.0.1'; FLUSH PRIVILEGES;"

  log "slurmdbd"
  /usr/sbin/slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster smoe >/dev/null
  sacctmgr -i add account "$ACCOUNT" cluster=smoe description=smoe-ci organization=smoe >/dev/null
  sacctmgr -i add user root account="$ACCOUNT" cluster=smoe >/dev/null

  log "slurmctld and slurmd"
  /usr/sbin/slurmctld
  wait_for 60 slurmctld scontrol ping
  /usr/sbin/slurmd -N "$HOST"
  wait_for 60 "node $HOST idle" node_idle
  sinfo
}

# stop_pidfile NAME FILE: TERM the process whose id FILE holds, then KILL it after 10 s.
stop_pidfile() {
  local name=$1 file=$2 pid
  [ -s "$file" ] || return 0
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 10); do kill -0 "$pid" 2>/dev/null || return 0; sleep 1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
}

down() {
  [ -e "$STATE" ] || { log "nothing to tear down ($STATE absent)"; return 0; }
  if [ -s "$STATE/slurmctld.pid" ] && command -v scancel >/dev/null; then
    scancel --full --quiet --cluster=smoe --user=root 2>/dev/null || true
    for _ in $(seq 10); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 1; done
  fi
  stop_pidfile slurmd "$STATE/slurmd.pid"
  stop_pidfile slurmctld "$STATE/slurmctld.pid"
  stop_pidfile slurmdbd "$STATE/slurmdbd.pid"
  stop_pidfile mariadbd "$STATE/mariadbd.pid"
  stop_pidfile munged "$STATE/munged.pid"
  if [ -e "$STATE/installed-system-conf" ]; then
    rm -f "$SYSTEM_CONF"
    if [ -e "$STATE/slurm.conf.system" ]; then mv "$STATE/slurm.conf.system" "$SYSTEM_CONF"; fi
  fi
  if [ "${SMOE_SLURM_SHOW_LOGS:-0}" = 1 ]; then
    for f in "$STATE"/log/*.log; do
      echo "----- last lines of $f"
      tail -n 30 "$f" || true
    done
  fi
  rm -rf "$STATE"
  log "torn down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
