#!/usr/bin/env bash
# The estimator comparison on one GPU: grpo, gspo, ctpo, ctpo_fixed × seeds on the
# `gpu` trainer preset (bf16 autocast), everything generated locally (task, demonstrations, warm start; no
# download), every output in ONE folder:
#
#   scripts/gpu_compare.sh [OUT_DIR] [--dry-run]
#
#   OUT_DIR         default: $OUT if set, else runs/compare-gpu
#     grid/           the comparison grid (runs/<loss>-seed<S>/, logs/, table2.md, paired.md, table3.md,
#                     curves.csv, fig2.png/.pdf)
#     cache/          the warm-start cache ($CTPO_LAB_CACHE, unless already set)
#     env.txt         device, versions and the resolved settings
#     gpu_compare.log everything printed
#     preflight/      a 2-step tiny run on CUDA done first (fails fast if CUDA training does not work)
#   --dry-run       (or CTPO_GPU_DRY_RUN=1) the same path on CPU with a tiny model and 2 steps: checks the
#                   script end to end on a machine without a GPU (≈ 1–2 minutes on 2 cores)
#
# Environment: SEEDS (default "0 1"), JOBS (parallel runs sharing the GPU, default 8), LOSSES (default
# "grpo gspo ctpo ctpo_fixed"), STEPS (override the preset's steps), PYTHON (default: .venv/bin/python if
# present, else python). The grid is resumable: rerunning the script with the same OUT_DIR reuses finished
# runs and resumes interrupted ones. Exit status: 0 done, 2 no CUDA device (or bad usage), else the grid's.
set -euo pipefail

DRY_RUN="${CTPO_GPU_DRY_RUN:-0}"
POSITIONAL=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg (expected --dry-run)" >&2; exit 2 ;;
    *) POSITIONAL+=("$arg") ;;
  esac
done
if [ "${#POSITIONAL[@]}" -gt 1 ]; then
  echo "error: at most one OUT_DIR argument, got ${POSITIONAL[*]}" >&2
  exit 2
fi

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT_DIR="${POSITIONAL[0]:-${OUT:-runs/compare-gpu}}"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi
export PYTHONUNBUFFERED=1
SEEDS="${SEEDS:-0 1}"
JOBS="${JOBS:-8}"
LOSSES="${LOSSES:-grpo gspo ctpo ctpo_fixed}"
LOG="$OUT_DIR/gpu_compare.log"

# a tiny model, short chains, 2 steps: the dry run's grid and the GPU preflight run
TINY=(steps=2 eval_every=1 eval_prompts=4 eval_samples=1 batch_prompts=2 group_size=2
      mini_batch_prompts=1 warmstart_steps=3 warmstart_batch=4 task_options.min_steps=3
      task_options.max_steps=4 model_options.hidden_size=32 model_options.num_layers=1
      model_options.num_heads=2 model_options.intermediate_size=64 ckpt_every=1 dump_every=1)
EXTRA=()
if [ "$DRY_RUN" = "1" ]; then
  EXTRA=(device=cpu "${TINY[@]}")  # the same script path on CPU
  JOBS="${JOBS_DRY:-2}"
  export OMP_NUM_THREADS=1
else
  if ! "$PYTHON" - <<'PY'
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(1)
print(f"[gpu_compare] CUDA device: {torch.cuda.get_device_name(0)}, bf16 supported: "
      f"{torch.cuda.is_bf16_supported()}", flush=True)
PY
  then
    echo "error: no CUDA device visible to PyTorch (torch.cuda.is_available() is False)." >&2
    echo "       This script runs the 'gpu' preset on one GPU; use --dry-run to check it on CPU." >&2
    exit 2
  fi
fi
if [ -n "${STEPS:-}" ]; then EXTRA+=("steps=$STEPS"); fi
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
export CTPO_LAB_CACHE="${CTPO_LAB_CACHE:-$OUT_DIR/cache}"

{
  echo "date: $(date -Is)"
  echo "host: $(hostname)"
  echo "dry_run: $DRY_RUN"
  echo "git: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo n/a)"
  echo "losses: $LOSSES  seeds: $SEEDS  jobs: $JOBS  overrides: ${EXTRA[*]:-}"
  "$PYTHON" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__)"
  command -v nvidia-smi >/dev/null && nvidia-smi -L || true
  # shellcheck disable=SC2086
  "$PYTHON" -m ctpo_lab.train --preset gpu --loss ctpo --print-config "${EXTRA[@]}"
} > "$OUT_DIR/env.txt" 2>&1 || { cat "$OUT_DIR/env.txt" >&2; echo "error: the gpu preset does not resolve" >&2; exit 2; }

start=$(date +%s)
# preflight (≈ 30 s): one tiny run of the gpu preset on the device (bf16 sampling, updates, eval, checkpoint)
# fails fast before the warm start and the grid spend the budget (on CPU in a dry run)
PREFLIGHT=("${TINY[@]}")
if [ "$DRY_RUN" = "1" ]; then PREFLIGHT=(device=cpu "${TINY[@]}"); fi
echo "[gpu_compare] preflight: 2 tiny steps of the gpu preset" | tee "$LOG"
if ! "$PYTHON" -m ctpo_lab.train --preset gpu --loss ctpo --out "$OUT_DIR/preflight" --overwrite --no-progress \
    "${PREFLIGHT[@]}" >> "$LOG" 2>&1; then
  tail -30 "$LOG" >&2
  echo "error: the preflight run failed; see $LOG" >&2
  exit 1
fi
# shellcheck disable=SC2086
"$PYTHON" -m ctpo_lab.train compare --preset gpu --loss $LOSSES --seeds $SEEDS --jobs "$JOBS" \
  --out "$OUT_DIR/grid" "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
end=$(date +%s)
if [ "$status" -ne 0 ]; then
  echo "error: the comparison grid failed (exit $status); logs in $OUT_DIR/grid/logs" | tee -a "$LOG" >&2
  exit "$status"
fi
{
  echo
  echo "## Table 2 analogue ($OUT_DIR/grid/table2.md)"
  cat "$OUT_DIR/grid/table2.md"
  if [ -f "$OUT_DIR/grid/paired.md" ]; then echo; echo "## Paired comparison"; cat "$OUT_DIR/grid/paired.md"; fi
  if [ -f "$OUT_DIR/grid/table3.md" ]; then echo; echo "## Table 3 analogue"; cat "$OUT_DIR/grid/table3.md"; fi
  echo
  echo "[gpu_compare] wall time $((end - start)) s; outputs in $OUT_DIR"
} | tee -a "$LOG"
