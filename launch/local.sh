#!/usr/bin/env bash
# Runs one experiment config on this machine.
#
#   launch/local.sh CONFIG WORKDIR [EXTRA_FLAGS...]
#   launch/local.sh configs/quickstart.py:runlocal /tmp/workdir
#   launch/local.sh configs/quickstart.py /tmp/qs --config.chunk_size=16
#   launch/local.sh configs/metapoison.py /tmp/mp --processes 2  # pinned processes
#
# Creates the repository's .venv on first use (python3 -m venv .venv &&
# .venv/bin/pip install -e '.[data]'), then runs
#   python -m jaxpoison --config CONFIG --workdir WORKDIR [EXTRA_FLAGS...]
# from the repository root. CONFIG and WORKDIR may be relative to the current
# directory or (CONFIG) to the repository root. Rerunning with the same WORKDIR
# resumes a sweep at its first unfinished chunk. `--processes N` runs N pinned
# JAX processes joined by jax.distributed (whole experiments measured slower than
# the default on 2 cores: README, Speed).
set -euo pipefail

usage() {
  sed -n '2,17s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

[ $# -ge 2 ] || usage
config=$1
workdir=$2
shift 2

abspath() {
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$PWD/$1" ;;
  esac
}

# A config is FILE[:ARG]; a FILE found from here is made absolute before the cd.
config_file=${config%%:*}
config_arg=${config#"$config_file"}
if [ -f "$config_file" ]; then
  config="$(abspath "$config_file")$config_arg"
fi
workdir=$(abspath "$workdir")

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

if [ ! -x .venv/bin/python ]; then
  echo "launch/local.sh: creating $repo/.venv" >&2
  python3 -m venv .venv
  .venv/bin/pip install -e '.[data]'  # the experiments read data through tfds
fi

exec .venv/bin/python -m jaxpoison --config "$config" --workdir "$workdir" "$@"
