#!/usr/bin/env bash
# Runs pix2seq_d_jax on every host of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh --tpu=NAME --zone=ZONE [--project=P] [--setup] \
#       [--dry_run] -- --config=configs/coco.py --workdir=gs://bucket/run \
#       --config.input.data_dir=gs://bucket/coco ...
#
# --workdir must be a bucket URL (gs://...), and so must
# --config.input.data_dir when given: each TPU host has its own disk, so a
# local path would give every host its own run folder (orbax's multi-host
# checkpoint needs one shared location) or a dataset only one host has.
# Every file the framework reads or writes goes through etils.epath.
#
# --setup copies this checkout to every host and installs it with the TPU
# wheels (once per slice). The run itself executes the same command on all
# workers (`--worker=all`); each calls jax.distributed.initialize()
# (`--distributed`), which finds its peers from the TPU metadata. Logs go to
# ~/pix2seq_d_jax.log on each host. --dry_run prints the commands instead.
set -euo pipefail

tpu="" zone="" project="" setup=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --setup) setup=1 ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch/tpu_pod.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" ]]; then
  echo "launch/tpu_pod.sh: --tpu=NAME and --zone=ZONE are required" >&2
  exit 2
fi
for arg in "$@"; do
  case "$arg" in
    --workdir=gs://*|--config.input.data_dir=gs://*) ;;
    --workdir=*|--config.input.data_dir=*)
      echo "launch/tpu_pod.sh: ${arg%%=*} must be a gs:// URL on a pod" \
           "(every host reads and writes it), got ${arg#*=}" >&2
      exit 2 ;;
  esac
done
if [[ " $* " != *" --workdir=gs://"* ]]; then
  echo "launch/tpu_pod.sh: pass --workdir=gs://BUCKET/RUN after --" >&2
  exit 2
fi
main_args=$(printf ' %q' "$@")
gcloud_args=(--zone="$zone" --worker=all)
[[ -n "$project" ]] && gcloud_args+=(--project="$project")

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"; echo
  else
    "$@"
  fi
}

repo=$(cd "$(dirname "$0")/.." && pwd)
remote_dir="~/$(basename "$repo")"
if [[ $setup -eq 1 ]]; then
  run gcloud compute tpus tpu-vm scp --recurse "$repo" "$tpu:~/" \
      "${gcloud_args[@]}"
  run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" \
      --command="cd $remote_dir && pip install -e '.[tpu]'"
fi
run gcloud compute tpus tpu-vm ssh "$tpu" "${gcloud_args[@]}" \
    --command="cd $remote_dir && python -m pix2seq_d_jax.main --distributed${main_args} 2>&1 | tee ~/pix2seq_d_jax.log"
