#!/usr/bin/env bash
# Submits pix2seq_d_jax to a SLURM GPU cluster: one process per GPU.
#
#   launch/slurm.sh --nodes=N --gpus_per_node=G [--partition=P] \
#       [--time=HH:MM:SS] [--dry_run] -- --config=configs/coco.py --workdir=DIR
#
# srun starts N*G tasks; each calls jax.distributed.initialize()
# (`--distributed`), which reads the coordinator, process count and index
# from SLURM's environment. --dry_run prints the batch script instead of
# submitting it.
#
# --workdir (and --config.input.data_dir) must be absolute paths on a file
# system every node mounts (or gs:// URLs): orbax writes one checkpoint from
# all processes into one folder. Before training, the batch script writes a
# marker into the workdir from the first node and every node checks that it
# sees it, so a node-local path fails in seconds instead of at the first
# checkpoint.
set -euo pipefail

nodes=1 gpus=8 partition="" time_limit="72:00:00" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --dry_run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "launch/slurm.sh: unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
workdir=""
for arg in "$@"; do
  case "$arg" in
    --workdir=*://*|--config.input.data_dir=*://*) ;;
    --workdir=/*|--config.input.data_dir=/*) ;;
    --workdir=*|--config.input.data_dir=*)
      echo "launch/slurm.sh: ${arg%%=*} must be an absolute path on the" \
           "shared file system (or a gs:// URL), got ${arg#*=}" >&2
      exit 2 ;;
  esac
  [[ "$arg" == --workdir=* ]] && workdir="${arg#*=}"
done
if [[ -z "$workdir" ]]; then
  echo "launch/slurm.sh: pass --workdir=/shared/path/run after --" >&2
  exit 2
fi
check=""
if [[ "$workdir" != *://* ]]; then
  marker="${workdir}/.shared_check_\${SLURM_JOB_ID}"
  check="mkdir -p $(printf '%q' "$workdir") && touch ${marker}
srun --ntasks-per-node=1 bash -c 'test -e ${marker} || { echo \"\$(hostname): ${workdir} is not on a shared file system\" >&2; exit 1; }'
rm -f ${marker}"
fi
main_args=$(printf ' %q' "$@")
repo=$(cd "$(dirname "$0")/.." && pwd)
script=$(cat <<SBATCH
#!/usr/bin/env bash
#SBATCH --job-name=pix2seq_d_jax
#SBATCH --nodes=${nodes}
#SBATCH --ntasks-per-node=${gpus}
#SBATCH --gpus-per-node=${gpus}
#SBATCH --time=${time_limit}
${partition:+#SBATCH --partition=${partition}}
#SBATCH --output=pix2seq_d_jax-%j.log
set -e
cd ${repo}
${check}
srun --kill-on-bad-exit=1 python -m pix2seq_d_jax.main --distributed${main_args}
SBATCH
)
if [[ $dry_run -eq 1 ]]; then
  echo "$script"
else
  echo "$script" | sbatch
fi
