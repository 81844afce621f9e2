#!/bin/bash
# privdpo DPO on several servers under Slurm: one torchrun per node, 8 GPUs each, the
# rendezvous on the first node. Submit with `sbatch examples/slurm_dpo.sh CONFIG`.
#SBATCH --job-name=privdpo-dpo
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=privdpo-%j.log
set -euo pipefail
CONFIG=${1:?usage: sbatch examples/slurm_dpo.sh CONFIG [key=value ...]}
shift
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun torchrun \
  --nnodes "$SLURM_NNODES" \
  --nproc_per_node 8 \
  --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d \
  --rdzv_endpoint "$HEAD:29500" \
  -m privdpo dpo "$CONFIG" "$@"
