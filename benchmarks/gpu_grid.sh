#!/bin/bash
# Many benchmarks/grid.py runs side by side on one GPU, under NVIDIA's MPS when it is there.
#
#   bash benchmarks/gpu_grid.sh JOBS [SECONDS]
#
# JOBS: one `grid.py run` argument list per line (blank lines and # comments skipped); each line
# becomes one process with one CPU thread and train.device=cuda (or $DEVICE), logging to
# ${LOGS:-gpu_grid_logs}/<line>.log. SECONDS (optional): stop every process then and evaluate
# each unfinished run from its best checkpoint (`grid.py finish` on every --out of JOBS); a
# stopped run goes on from its last.pt once its metrics*.json and STOPPED are deleted.
# MPS lets the processes' kernels run at once instead of taking turns (README, "CPU or GPU").
set -u
JOBS=${1:?usage: gpu_grid.sh JOBS [SECONDS]}
SECONDS_LEFT=${2:-0}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu tries a jobs file without a GPU
LOGS=${LOGS:-gpu_grid_logs}
mkdir -p "$LOGS"
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
if [ -z "${CUDA_MPS_PIPE_DIRECTORY:-}" ] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/nvidia-mps-grid CUDA_MPS_LOG_DIRECTORY=/tmp/nvidia-mps-grid-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    echo "MPS daemon started ($CUDA_MPS_PIPE_DIRECTORY)"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    echo "MPS did not start: the processes will take turns on the GPU"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
fi
limit=()
[ "$SECONDS_LEFT" -gt 0 ] && limit=(timeout "$SECONDS_LEFT")
n=0
roots=()
while read -r line; do
  case "$line" in ''|'#'*) continue ;; esac
  n=$((n + 1))
  read -ra args <<< "$line"
  for i in "${!args[@]}"; do [ "${args[$i]}" = --out ] && roots+=("${args[$((i + 1))]}"); done
  "${limit[@]}" $PY "$HERE/grid.py" run "${args[@]}" --threads 1 --override train.device=$DEVICE \
    > "$LOGS/$n.log" 2>&1 &
done < "$JOBS"
echo "$n processes started"
wait
for root in $(printf '%s\n' "${roots[@]}" | sort -u); do
  $PY "$HERE/grid.py" finish "$root" && $PY "$HERE/grid.py" summary "$root"
done
