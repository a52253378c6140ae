#!/usr/bin/env bash
# The Slurm CI step: install Slurm, munge and MariaDB from Debian's packages, start a
# single-node cluster on loopback (.ci/slurm/cluster.sh), run the tests marked `slurm`
# (tests/slurm/), and tear the cluster down whatever happened.
#
#   bash .ci/slurm/run-test.sh          # as root on Debian/Ubuntu; `.ci/run` runs it last
#
# Outside CI, a machine where it cannot run (not root, no apt-get, packages that do not
# install) skips the step and says why; in CI (CI=true) each of those fails it.
set -euo pipefail
cd "$(dirname "$0")/../.."

cannot() {
  if [ "${CI:-}" = true ]; then
    echo "Slurm step FAILED: $*" >&2
    exit 1
  fi
  echo "Slurm step SKIPPED: $*"
  exit 0
}

[ "$(id -u)" = 0 ] ||
  cannot "needs root (installs Debian packages, starts munged, MariaDB and the Slurm daemons)"
command -v apt-get >/dev/null || cannot "needs apt-get (Debian's slurm-wlm, slurmdbd, munge, mariadb-server)"

PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)
installed() {
  local package
  for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed' || return 1
  done
}
if installed; then
  echo "Slurm step: ${PACKAGES[*]} already installed"
else
  echo "Slurm step: installing ${PACKAGES[*]}"
  INSTALL_LOG=/tmp/smoe-ci-slurm-apt.log
  if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends "${PACKAGES[@]}"; } >"$INSTALL_LOG" 2>&1; then
    tail -n 20 "$INSTALL_LOG"
    cannot "installing ${PACKAGES[*]} failed (log: $INSTALL_LOG)"
  fi
fi
python -c 'import snakemake_executor_plugin_slurm' 2>/dev/null ||
  cannot "the executor plugin is not installed: pip install -c .ci/constraints.txt -e '.[dev,slurm]'"

export SMOE_SLURM_STATE="${SMOE_SLURM_STATE:-/tmp/smoe-slurm}"
export SMOE_SLURM_PARTITION=smoe-ci SMOE_SLURM_ACCOUNT=smoe-ci
if [ -e "$SMOE_SLURM_STATE" ]; then
  echo "Slurm step FAILED: $SMOE_SLURM_STATE holds a cluster of an earlier run;" \
    "stop it with 'bash .ci/slurm/cluster.sh down'" >&2
  exit 1
fi

teardown() {
  local status=$?
  # the daemons' logs are worth seeing when something failed
  SMOE_SLURM_SHOW_LOGS=$([ "$status" = 0 ] && echo 0 || echo 1) bash .ci/slurm/cluster.sh down
  exit "$status"
}
trap teardown EXIT

bash .ci/slurm/cluster.sh up
SMOE_SLURM_CLUSTER=up python -m pytest tests/slurm -m slurm -p no:cacheprovider -s
