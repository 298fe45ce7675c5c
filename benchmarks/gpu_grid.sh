#!/bin/bash
# Many `dist-tp sweep` processes side by side on one GPU, under NVIDIA's MPS when it is there.
#
#   bash benchmarks/gpu_grid.sh JOBS [SECONDS]
#
# JOBS: one `dist-tp sweep` argument list per line, `CONFIG [key=value ...] [options]` (blank
# lines and # comments skipped); each line becomes one sweep process whose runs have one CPU
# thread each and train.device=cuda (or $DEVICE), logging to ${LOGS:-gpu_grid_logs}/<line>.log.
# Every finished run is also evaluated without the history mask (metrics_nohist.json).
# SECONDS (optional): stop every process then (SIGTERM: each training keeps its last.pt and
# best checkpoint.pt). At the end `dist-tp finish` evaluates every unfinished run of each --out
# of JOBS from its best checkpoint, and `dist-tp table --mean` prints each --out. A stopped run
# goes on from its last.pt once its metrics*.json and STOPPED are deleted (run its line again).
# MPS lets the processes' kernels run at once instead of taking turns (README, "CPU or GPU").
set -u
JOBS=${1:?usage: gpu_grid.sh JOBS [SECONDS]}
SECONDS_LEFT=${2:-0}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}  # DEVICE=cpu tries a jobs file without a GPU
LOGS=${LOGS:-gpu_grid_logs}
NOHIST='nohist eval.exclude_history=false'
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
  # the config, then this script's overrides, then the line's overrides and options
  "${limit[@]}" $PY -m dist_tp sweep "${args[0]}" train.threads=1 train.device="$DEVICE" \
    "${args[@]:1}" --extra-eval "$NOHIST" > "$LOGS/$n.log" 2>&1 &
done < "$JOBS"
echo "$n processes started"
wait
for root in $(printf '%s\n' "${roots[@]}" | sort -u); do
  $PY -m dist_tp finish "$root" --extra-eval "$NOHIST" && $PY -m dist_tp table --mean "$root"
done
