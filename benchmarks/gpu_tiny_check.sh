#!/usr/bin/env bash
# The real-editor code path on a CUDA GPU, without model weights: builds the test suite's tiny
# random FLUX.1-Kontext and Qwen-Image-Edit pipelines (tests/tiny_pipelines.py), runs
# tests/test_real_editors.py there (the adapters pick cuda when it is available), then
# benchmarks/gpu_smoke.sh on the tiny pipelines with every real-editor preset (bf16, LoRA,
# GRPO and NFT). It checks device placement, dtypes and the training loop on a GPU; the
# timings and memory are those of toy models and say nothing about real ones.
#
#   bash benchmarks/gpu_tiny_check.sh [OUT_DIR]
#
# PYTHON: interpreter with editrl's dependencies and the `hf` extra (default: .venv/bin/python,
# else python3). editrl itself is imported from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_tiny_check}
mkdir -p "$OUT"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
TINY=$(mktemp -d)
"$PYTHON" - "$TINY" <<'PY' || { echo "gpu_tiny_check: could not build the tiny pipelines" >&2; exit 2; }
import sys, torch
from tiny_pipelines import save_tiny_flux_kontext, save_tiny_qwen_edit
root = sys.argv[1]
save_tiny_flux_kontext(f"{root}/kontext")
save_tiny_qwen_edit(f"{root}/qwen")
print(f"gpu_tiny_check: torch {torch.__version__}, cuda {torch.cuda.is_available()}, "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}", file=sys.stderr)
PY
"$PYTHON" -m pytest -q -p no:cacheprovider tests/test_real_editors.py 2>&1 | tee "$OUT/test_real_editors.log" | tail -25
TESTS=${PIPESTATUS[0]}
# random weights fail every edit, so the filters would mask every group: off, so the updates run
KONTEXT_PATH="$TINY/kontext" QWEN_EDIT_PATH="$TINY/qwen" CONFIGS="kontext-nft kontext-grpo qwen-edit-nft qwen-edit-grpo" \
  TOKENS=${TOKENS:-32} STEPS=${STEPS:-4} PYTHON="$PYTHON" \
  SMOKE_ARGS=${SMOKE_ARGS-"sessions_per_step=2 group=8 adv.group_filter=false adv.trajectory_filter=false"} \
  bash benchmarks/gpu_smoke.sh "$OUT/smoke" 2>&1 | tee "$OUT/smoke.log" | tail -30
SMOKE=${PIPESTATUS[0]}
# every step must have trained: a skipped step (non-finite gradient, nothing trained) fails the check
SKIPPED=$(cat "$OUT"/smoke/*/metrics.jsonl 2>/dev/null | grep -c '"skipped"')
echo "gpu_tiny_check: tests rc=$TESTS, smoke rc=$SMOKE, skipped steps $SKIPPED" >&2
exit $(( TESTS != 0 || SMOKE != 0 || SKIPPED != 0 ))
