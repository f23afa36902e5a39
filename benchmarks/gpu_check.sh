#!/usr/bin/env bash
# One call on a CUDA machine: every --device cuda benchmark at a size that fits a few minutes,
# then chapter 3 at a reduced `gpu` size. Results go to $OUT (default _build/gpu-check), one
# text file per step plus summary.txt; copy the figures into benchmarks/README.md, naming the
# device printed in nvidia-smi.txt.
#
#   bash benchmarks/gpu_check.sh                 # or: make gpu-check
#   OUT=/some/dir STEP_TIMEOUT=120 bash benchmarks/gpu_check.sh
#
# Budget: at most 12 minutes (9 steps capped at STEP_TIMEOUT = 60 s, the chapter at
# CHAPTER_TIMEOUT = 180 s; expect about half); a step that fails or times out (rc 124) is
# recorded and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/_build/gpu-check}
STEP_TIMEOUT=${STEP_TIMEOUT:-60}
CHAPTER_TIMEOUT=${CHAPTER_TIMEOUT:-180}
mkdir -p "$OUT"
PY=${PY:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} MPLBACKEND=Agg
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

SUMMARY=$OUT/summary.txt
: > "$SUMMARY"
(nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))") \
    > "$OUT/nvidia-smi.txt" 2>&1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: nothing to check (see $OUT/nvidia-smi.txt)" | tee -a "$SUMMARY"
    exit 2
fi

step() {  # step NAME TIMEOUT CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name: $*" | tee -a "$SUMMARY"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "   rc=$rc in $((SECONDS - t0)) s; last lines:" >> "$SUMMARY"
    grep -v "USDT\|profiler_st" "$OUT/$name.txt" | tail -n 12 | sed 's/^/   /' >> "$SUMMARY"
}

# SAE step: TFLOP/s against the fp32 / TF32 / BF16 matmul roofline measured in the same run,
# top-AFA vs TopK at matched L0, ours vs SAELens (the paper's shapes: 768 -> 12288, k 64)
step train_step "$STEP_TIMEOUT" "$PY" benchmarks/train_step.py --device cuda --repeats 5
step topafa "$STEP_TIMEOUT" "$PY" benchmarks/topafa.py --device cuda --repeats 5 --threads 4
# harvest vs a bare forward pass (goal >= 0.9x)
step activations "$STEP_TIMEOUT" "$PY" benchmarks/activations.py --device cuda --rows 256 --batch-size 64
step epsilon "$STEP_TIMEOUT" "$PY" benchmarks/epsilon.py --device cuda
step stitching "$STEP_TIMEOUT" "$PY" benchmarks/stitching.py --device cuda
step zf "$STEP_TIMEOUT" "$PY" benchmarks/zf.py --device cuda --rows 64
step meta "$STEP_TIMEOUT" "$PY" benchmarks/meta.py --device cuda --max-steps 300 --min-steps 100
# end-to-end TopK training against SAELens (and the peers when .bench-peers holds them)
step peers "$STEP_TIMEOUT" "$PY" benchmarks/peers.py --device cuda --tokens 4194304 --threads 4
# two ranks need two GPUs; with one the script says so and exits
step distributed "$STEP_TIMEOUT" "$PY" benchmarks/distributed.py --device cuda

# Chapter 3 at a reduced `gpu` size: the gpu profile's parameters (the embedded profile's when
# no gpu profile exists), cut to one layer, one seed, two members per sweep and 4 M tokens.
PROFILE_DIR=$OUT/profile-gpu-reduced
"$PY" - "$ROOT" "$PROFILE_DIR" "$OUT/runs" <<'EOF'
import sys
from pathlib import Path

import yaml

root, dst, runs = map(Path, sys.argv[1:])
src = root / "profiles" / "gpu"
if not (src / "03_training.yaml").exists():
    src = root / "profiles" / "embedded"
p = yaml.safe_load((src / "03_training.yaml").read_text())
cut = {"device": "cuda", "runs_dir": str(runs), "progress": False}
for key in ("topk_ks", "batchtopk_ks", "afa_coeffs"):
    if isinstance(p.get(key), list):
        cut[key] = p[key][:2]
if isinstance(p.get("layers"), list):
    cut["layers"] = p["layers"][:1]
if isinstance(p.get("seeds"), list):
    cut["seeds"] = p["seeds"][:1]
tokens = min(int(p.get("train_tokens", 4_194_304)), 4_194_304)
cut["train_tokens"] = tokens
for key in ("warmup_steps", "decay_steps"):
    if key in p:
        cut[key] = min(int(p[key]), tokens // int(p.get("batch_size", 4096)) // 4)
if "checkpoint_every" in p:
    cut["checkpoint_every"] = 0
p.update(cut)
dst.mkdir(parents=True, exist_ok=True)
(dst / "03_training.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
print(f"chapter 3 parameters from {src}, reduced: {cut}")
EOF
cp "$PROFILE_DIR/03_training.yaml" "$OUT/chapter03-parameters.yaml" 2>/dev/null
step chapter03 "$CHAPTER_TIMEOUT" "$PY" -m saelib.book run --profile "$PROFILE_DIR" --only 03_training --no-html
cp notebooks/03_training.ipynb "$OUT/chapter03-executed.ipynb" 2>/dev/null
cp _build/failed/03_training.ipynb "$OUT/chapter03-failed.ipynb" 2>/dev/null
echo "done: $OUT/summary.txt"
