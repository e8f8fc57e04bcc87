#!/usr/bin/env bash
# Cloud TPU VM (single host or pod slice): create, set up, run a config on every
# worker with jax.distributed, delete.
#
#   launch/tpu_vm.sh create NAME ZONE TYPE [GCLOUD_FLAGS...]
#   launch/tpu_vm.sh setup  NAME ZONE
#   launch/tpu_vm.sh run    NAME ZONE CONFIG WORKDIR [EXTRA_FLAGS...]
#   launch/tpu_vm.sh fetch  NAME ZONE WORKDIR DEST
#   launch/tpu_vm.sh delete NAME ZONE
#
# Examples:
#   launch/tpu_vm.sh create jp-v4 us-central2-b v4-32
#   launch/tpu_vm.sh create jp-v5e us-west4-a v5litepod-16 --spot
#   launch/tpu_vm.sh setup jp-v4 us-central2-b
#   launch/tpu_vm.sh run jp-v4 us-central2-b configs/quickstart.py '~/runs/qs'
#   launch/tpu_vm.sh fetch jp-v4 us-central2-b '~/runs/qs' ./qs_tpu
#   launch/tpu_vm.sh delete jp-v4 us-central2-b
#
# create: `gcloud compute tpus tpu-vm create` with the TPU software version Google
#   lists for JAX on that TPU generation (override: TPU_VERSION=...).
# setup: packs the repository (tracked and untracked, not ignored files), copies it
#   to every worker (`tpu-vm scp --worker=all`), unpacks it into ~/jaxpoison and
#   pip-installs `jax[tpu]` (override: JAX_SPEC=...) and the package into
#   ~/jaxpoison/.venv on every worker (`tpu-vm ssh --worker=all --command`),
#   installing Python 3.11 from apt where the image's python3 is older.
# run: `python -m jaxpoison --config CONFIG --workdir WORKDIR --distributed` on
#   every worker at once, from ~/jaxpoison (CONFIG is relative to it; WORKDIR is
#   on each worker's own disk: quote a "~/..." so it is expanded there; a relative
#   one is relative to ~/jaxpoison). Rerun to resume a sweep.
#   TFDS_DATA_DIR, if set here, is set there too (e.g. a gs:// bucket).
#   SYNC_TO=gs://BUCKET/PATH: every worker first copies PATH into WORKDIR (so a
#   recreated, preempted slice resumes where the bucket copy ends), and worker 0
#   copies WORKDIR to PATH every SYNC_SECONDS (default 120) and at the end.
# fetch: copies WORKDIR from worker 0 into the local folder DEST (scp --recurse).
# delete: deletes the TPU VM (asks for confirmation unless --quiet is passed).
#
# Uses gcloud's default project unless CLOUDSDK_CORE_PROJECT is set.
set -euo pipefail

REMOTE_DIR=jaxpoison # under the remote home directory
JAX_SPEC=${JAX_SPEC:-jax[tpu]}

usage() {
  sed -n '2,39s/^# \{0,1\}//p' "$0" >&2
  exit 2
}

# TPU software versions for JAX (cloud.google.com/tpu/docs/runtimes).
default_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    *) echo tpu-ubuntu2204-base ;;
  esac
}

cmd_create() {
  [ $# -ge 3 ] || usage
  local name=$1 zone=$2 type=$3
  shift 3
  gcloud compute tpus tpu-vm create "$name" \
    --zone="$zone" \
    --accelerator-type="$type" \
    --version="${TPU_VERSION:-$(default_version "$type")}" \
    "$@"
}

cmd_setup() {
  [ $# -eq 2 ] || usage
  local name=$1 zone=$2 repo
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  tmp=$(mktemp -d) # global: the EXIT trap runs after this function returns
  trap 'rm -rf "$tmp"' EXIT
  # Every file git would commit (tracked or new), none it ignores (.venv, builds).
  git -C "$repo" ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do
      if [ -f "$repo/$f" ]; then printf '%s\0' "$f"; fi
    done >"$tmp/files"
  tar -C "$repo" --null -T "$tmp/files" -czf "$tmp/jaxpoison.tar.gz"
  gcloud compute tpus tpu-vm scp "$tmp/jaxpoison.tar.gz" "$name:" \
    --zone="$zone" --worker=all

  local remote
  remote="REMOTE_DIR=$(printf %q "$REMOTE_DIR") JAX_SPEC=$(printf %q "$JAX_SPEC")"
  remote+=$(
    cat <<'EOF'
; set -eu
cd ~
mkdir -p "$REMOTE_DIR"
find "$REMOTE_DIR" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
tar -xzf jaxpoison.tar.gz -C "$REMOTE_DIR"
rm jaxpoison.tar.gz
cd "$REMOTE_DIR"
py=python3
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  sudo apt-get update -q
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3.11 python3.11-venv
  py=python3.11
fi
if [ ! -x .venv/bin/python ]; then "$py" -m venv .venv; fi
.venv/bin/pip install -q -U pip
.venv/bin/pip install -q -U "$JAX_SPEC" -e '.[data]'
.venv/bin/python -c 'import jax; print(jax.__version__, jax.local_devices())'
EOF
  )
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
    --command="$remote"
}

cmd_run() {
  [ $# -ge 4 ] || usage
  local name=$1 zone=$2 config=$3 workdir=$4 command arg remote
  shift 4
  command=".venv/bin/python -m jaxpoison"
  command+=" --config $(printf %q "$config") --workdir $(printf %q "$workdir")"
  command+=" --distributed"
  for arg in "$@"; do command+=" $(printf %q "$arg")"; done
  remote="cd ~/$REMOTE_DIR"
  if [ -n "${TFDS_DATA_DIR:-}" ]; then # e.g. a gs:// bucket every worker reads
    remote+=" && export TFDS_DATA_DIR=$(printf %q "$TFDS_DATA_DIR")"
  fi
  if [ -z "${SYNC_TO:-}" ]; then
    remote+=" && $command"
  else
    remote+=" && SYNC_TO=$(printf %q "$SYNC_TO") WORKDIR=$(printf %q "$workdir")"
    remote+=" SYNC_SECONDS=$(printf %q "${SYNC_SECONDS:-120}")"
    remote+=" COMMAND=$(printf %q "$command")"
    remote+=$(
      cat <<'EOF'
; set -u
worker=$(curl -sf -H Metadata-Flavor:Google \
  http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number ||
  echo 0)
case $WORKDIR in "~"/*) WORKDIR=$HOME/${WORKDIR#"~/"} ;; esac
mkdir -p "$WORKDIR"
# A first run finds nothing to copy; a rerun on a recreated slice resumes from it.
gcloud storage rsync -r "$SYNC_TO" "$WORKDIR" 2>/dev/null || true
syncer=
if [ "$worker" = 0 ]; then
  (
    # wait is interrupted by TERM; the trap then ends the sleep too, so no
    # child keeps the ssh session open.
    trap 'kill "$nap" 2>/dev/null; exit 0' TERM
    while :; do
      sleep "$SYNC_SECONDS" &
      nap=$!
      wait "$nap"
      gcloud storage rsync -r "$WORKDIR" "$SYNC_TO"
    done
  ) &
  syncer=$!
fi
rc=0
eval "$COMMAND" || rc=$?
if [ -n "$syncer" ]; then
  kill "$syncer"
  wait "$syncer" || true
  gcloud storage rsync -r "$WORKDIR" "$SYNC_TO"
fi
exit "$rc"
EOF
    )
  fi
  gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all \
    --command="$remote"
}

cmd_fetch() {
  [ $# -eq 4 ] || usage
  local name=$1 zone=$2 workdir=$3 dest=$4
  case $workdir in # scp's remote paths are relative to the home directory
    "~"/*) workdir=${workdir#"~/"} ;;
    /*) ;;
    *) workdir=$REMOTE_DIR/$workdir ;; # `run` works in ~/jaxpoison
  esac
  mkdir -p "$dest"
  gcloud compute tpus tpu-vm scp --recurse "$name:$workdir" "$dest" \
    --zone="$zone" --worker=0
}

cmd_delete() {
  [ $# -ge 2 ] || usage
  local name=$1 zone=$2
  shift 2
  gcloud compute tpus tpu-vm delete "$name" --zone="$zone" "$@"
}

[ $# -ge 1 ] || usage
sub=$1
shift
case $sub in
  create) cmd_create "$@" ;;
  setup) cmd_setup "$@" ;;
  run) cmd_run "$@" ;;
  fetch) cmd_fetch "$@" ;;
  delete) cmd_delete "$@" ;;
  -h | --help | help) usage ;;
  *)
    echo "launch/tpu_vm.sh: unknown subcommand '$sub'" >&2
    usage
    ;;
esac
