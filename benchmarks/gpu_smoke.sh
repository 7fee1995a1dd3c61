#!/usr/bin/env bash
# GPU smoke benchmark of RL post-training on real editors (issue 7): a few `editrl train` steps
# per preset with step time, peak GPU memory and a rough MFU estimate, summarised as JSON.
#
#   KONTEXT_PATH=/models/FLUX.1-Kontext-dev QWEN_EDIT_PATH=/models/Qwen-Image-Edit \
#       bash benchmarks/gpu_smoke.sh [OUT_DIR]
#
# Presets run: kontext-nft and kontext-grpo when KONTEXT_PATH is set, qwen-edit-nft when
# QWEN_EDIT_PATH is set (override with CONFIGS="kontext-nft qwen-edit-grpo"). Each runs
#   editrl train --config PRESET model.path=PATH max_steps=$STEPS $SMOKE_ARGS --out OUT_DIR/PRESET
# in one python process that reports torch.cuda.max_memory_allocated / max_memory_reserved;
# nvidia-smi is sampled every second for the device-level peak (includes the CUDA context).
#
# Environment:
#   KONTEXT_PATH, QWEN_EDIT_PATH  local diffusers pipeline folders (save_pretrained layout)
#   STEPS       RL steps per preset (default 3; step 1 is warm-up and left out of the means)
#   SMOKE_ARGS  extra key=value overrides (default "sessions_per_step=2 group=8": small enough
#               for a 10-minute slot; set SMOKE_ARGS="" for the presets' own batch)
#   TOKENS      transformer sequence length per sample for the MFU estimate (default: 544 for
#               kontext = 16 target + 16 condition latent tokens + 512 T5 tokens on 64x64
#               ShapesWorld images; 288 for qwen-edit = 32 latent tokens + ~256 text tokens)
#   PEAK_TFLOPS dense bf16 peak of the GPU (default: 989 for H100/H200, 312 for A100, else 989)
#   PYTHON      interpreter with editrl installed (default: .venv/bin/python, else python3)
#
# MFU formula (a rough, documented estimate; attention's T^2 term, the VAE and the text
# encoders are ignored, so it undercounts):
#   FLOPs per transformer call on one sample  F = 2 * N * T
#     N = transformer parameters (read from OUT's safetensors headers: transformer/*.safetensors)
#     T = TOKENS
#   rollout:  calls = B*G*K*rollout_steps                              (forward only)
#   NFT:      calls = nft/samples * (1 θ forward + 1 old forward + 2 backward [+1 ref forward])
#   GRPO:     calls = grpo/transitions * (1 forward + 2 backward [+1 ref forward when kl_beta>0])
#     (backward ~2x forward: activation gradients through the frozen weights; LoRA weight
#      gradients are negligible)
#   MFU = (rollout + update FLOPs) / (rollout + update seconds) / PEAK_TFLOPS
# Rollouts run at batch B*G and are latency-bound on small images, so expect a low MFU there.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_smoke}
STEPS=${STEPS:-3}
SMOKE_ARGS=${SMOKE_ARGS-"sessions_per_step=2 group=8"}
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_smoke: no NVIDIA GPU found (nvidia-smi missing or failing); this benchmark needs a GPU." >&2
  exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_smoke: torch.cuda.is_available() is False in $PYTHON; install a CUDA build of torch." >&2
  exit 2
fi
if [[ -z "${CONFIGS:-}" ]]; then
  CONFIGS=""
  [[ -n "${KONTEXT_PATH:-}" ]] && CONFIGS="kontext-nft kontext-grpo"
  [[ -n "${QWEN_EDIT_PATH:-}" ]] && CONFIGS="$CONFIGS qwen-edit-nft"
fi
if [[ -z "${CONFIGS// /}" ]]; then
  echo "gpu_smoke: no model path given: set KONTEXT_PATH and/or QWEN_EDIT_PATH to local diffusers pipeline folders." >&2
  exit 2
fi

GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
if [[ -z "${PEAK_TFLOPS:-}" ]]; then
  case "$GPU_NAME" in
    *A100*) PEAK_TFLOPS=312 ;;
    *) PEAK_TFLOPS=989 ;;   # H100 / H200 SXM dense bf16
  esac
fi
mkdir -p "$OUT"
echo "gpu_smoke: $GPU_NAME, presets: $CONFIGS, steps: $STEPS, overrides: ${SMOKE_ARGS:-none}" >&2

for PRESET in $CONFIGS; do
  case "$PRESET" in
    kontext-*) MPATH=${KONTEXT_PATH:-}; TOK=${TOKENS:-544} ;;
    qwen-edit-*) MPATH=${QWEN_EDIT_PATH:-}; TOK=${TOKENS:-288} ;;
    *) echo "gpu_smoke: unknown preset $PRESET" >&2; exit 2 ;;
  esac
  if [[ -z "$MPATH" || ! -d "$MPATH" ]]; then
    echo "gpu_smoke: $PRESET needs an existing model folder (got '${MPATH}'); skipping" >&2
    continue
  fi
  RUN="$OUT/$PRESET"
  rm -rf "$RUN"
  # device-level peak memory: sample nvidia-smi while the run goes
  SMI_LOG="$OUT/$PRESET.smi"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 1000 >"$SMI_LOG" 2>/dev/null &
  SMI_PID=$!
  T0=$(date +%s.%N)
  set +e
  # shellcheck disable=SC2086
  "$PYTHON" - "$RUN" "$PRESET" "$MPATH" "$STEPS" $SMOKE_ARGS <<'PY'
import json, sys, torch
run, preset, mpath, steps, *extra = sys.argv[1:]
torch.cuda.reset_peak_memory_stats()
from editrl.cli import main
sys.argv = ["editrl", "train", "--config", preset, f"model.path={mpath}", f"max_steps={steps}",
            "final_eval=false", *extra, "--out", run]
code = 0
try:
    main()
except SystemExit as e:
    code = e.code or 0
with open(f"{run}.mem.json", "w") as f:
    json.dump({"max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
               "max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30, "exit": code}, f)
sys.exit(code)
PY
  RC=$?
  set -e
  T1=$(date +%s.%N)
  kill "$SMI_PID" 2>/dev/null || true
  wait "$SMI_PID" 2>/dev/null || true
  awk -v rc="$RC" -v a="$T0" -v b="$T1" 'BEGIN { printf "{\"rc\": %d, \"wall_s\": %.2f}\n", rc, b - a }' >"$RUN.rc.json"
  if [[ $RC -ne 0 ]]; then
    echo "gpu_smoke: $PRESET failed with exit code $RC (see output above)" >&2
  fi
  "$PYTHON" - "$RUN" "$PRESET" "$MPATH" "$TOK" "$PEAK_TFLOPS" "$GPU_NAME" "$SMI_LOG" <<'PY'
import glob, json, os, struct, sys
run, preset, mpath, tokens, peak, gpu, smi = sys.argv[1:]
tokens, peak = int(tokens), float(peak)

def n_params(folder):
    n = 0
    for f in glob.glob(os.path.join(folder, "transformer", "*.safetensors")):
        with open(f, "rb") as fh:
            hdr = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        for k, v in hdr.items():
            if k != "__metadata__":
                c = 1
                for d in v["shape"]:
                    c *= d
                n += c
    return n

rows = []
if os.path.exists(os.path.join(run, "metrics.jsonl")):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
cfg = json.load(open(os.path.join(run, "config.json"))) if os.path.exists(os.path.join(run, "config.json")) else {}
mem = json.load(open(f"{run}.mem.json")) if os.path.exists(f"{run}.mem.json") else {}
rc = json.load(open(f"{run}.rc.json"))
smi_peak = max((float(x) for x in open(smi).read().split() if x.strip().replace(".", "").isdigit()), default=None)
timed = rows[1:] if len(rows) > 1 else rows          # step 1 is warm-up (compilation, allocator)
sig = lambda x: float(f"{x:.3g}")                     # noqa: E731
mean = lambda k: sum(r.get(k, 0.0) for r in timed) / len(timed) if timed else None   # noqa: E731
N = n_params(mpath)
summary = {"preset": preset, "gpu": gpu, "rc": rc["rc"], "wall_s": rc["wall_s"], "steps_logged": len(rows),
           "transformer_params": N, "tokens_per_sample": tokens, "peak_tflops": peak,
           "peak_mem_allocated_gb": mem.get("max_allocated_gb"), "peak_mem_reserved_gb": mem.get("max_reserved_gb"),
           "peak_mem_nvidia_smi_gb": smi_peak / 1024 if smi_peak is not None else None}
if timed and cfg:
    t_roll, t_rew, t_upd = mean("time/rollout_s"), mean("time/reward_s"), mean("time/update_s")
    B, G, K, S = cfg["sessions_per_step"], cfg["group"], cfg["turns"], cfg["rollout_steps"]
    F = 2.0 * N * tokens
    roll_flops = B * G * K * S * F
    if cfg["algorithm"] == "nft":
        calls = mean("nft/samples") * (4 + (1 if cfg.get("nft_ref_weight", 0) > 0 else 0))
    else:
        calls = mean("grpo/transitions") * (3 + (1 if cfg.get("kl_beta", 0) > 0 else 0))
    upd_flops = calls * F
    secs = t_roll + t_upd
    summary.update({"step_s": round(t_roll + t_rew + t_upd, 3), "rollout_s": t_roll, "reward_s": t_rew,
                    "update_s": t_upd, "loss_s": mean("time/loss_s"), "optim_s": mean("time/optim_s"),
                    "tflop_per_step": sig((roll_flops + upd_flops) / 1e12),
                    "mfu": sig((roll_flops + upd_flops) / secs / (peak * 1e12)) if secs > 0 else None,
                    "mfu_rollout": sig(roll_flops / t_roll / (peak * 1e12)) if t_roll > 0 else None,
                    "mfu_update": sig(upd_flops / t_upd / (peak * 1e12)) if t_upd > 0 else None})
json.dump(summary, open(f"{run}.summary.json", "w"), indent=2)
print(json.dumps(summary))
PY
done

"$PYTHON" - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
res = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "*.summary.json")))]
json.dump(res, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(f"gpu_smoke: wrote {os.path.join(out, 'summary.json')}", file=sys.stderr)
for r in res:
    mem = r.get("peak_mem_allocated_gb")
    print(f"{r['preset']:>14}: rc={r['rc']} step {r.get('step_s')} s, peak alloc "
          f"{mem if mem is None else round(mem, 1)} GB, MFU {r.get('mfu')}", file=sys.stderr)
sys.exit(0 if res and all(r["rc"] == 0 for r in res) else 1)
PY
