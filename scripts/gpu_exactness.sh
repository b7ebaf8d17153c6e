#!/usr/bin/env bash
# Issue 18's table on a GPU machine (docs/exactness.md): `demo` races mlx-lm's plain greedy
# against DSpark, normal and --exact, on the demo pair's 120 prompts in float32 and bfloat16;
# `synthetic` runs scripts/gpu_exactness.py on random Qwen3-4B-shaped 8- and 4-bit targets.
# Usage: scripts/gpu_exactness.sh demo|synthetic OUT_DIR   (PYTHON, BENCH_TIMEOUT: optional)
# The demo prompts go through the chat template, as `generate` sends them: without it the prose
# and math prompts end at once (the 2026-12-05 run measured that way; docs/exactness.md).
set -u
part=$1; out=$2; mkdir -p "$out"
demo=mlx_specdec/demo
py=${PYTHON:-python3}
bench() {  # bench NAME MODEL [--exact]: greedy, 96 new tokens, cap 7
  timeout "${BENCH_TIMEOUT:-170}" $py -m mlx_specdec bench --model "$2" --drafter "dspark=$demo/dspark" \
    --modes baseline,dspark --prompts $demo/prompts.jsonl --max-draft 7 \
    --max-new-tokens 96 --trials 1 --drafter-bits 32 --cost-reps 1 --json "$out/$1.json" "${@:3}" \
    > "$out/$1.txt" 2>&1
  echo "$1: rc $?"; tail -n 25 "$out/$1.txt"
}
if [ "$part" = demo ]; then
  $py - <<'PY'
import shutil, mlx.core as mx
src, dst = "mlx_specdec/demo/target", "/tmp/demo-bf16"
shutil.copytree(src, dst, dirs_exist_ok=True)
w = mx.load(f"{src}/model.safetensors")
mx.save_safetensors(f"{dst}/model.safetensors", {k: v.astype(mx.bfloat16) for k, v in w.items()})
PY
  timeout 90 $py -m mlx_specdec doctor --model /tmp/demo-bf16 --json "$out/doctor-bf16.json" > "$out/doctor-bf16.txt" 2>&1
  echo "doctor bf16: rc $?"; tail -n 30 "$out/doctor-bf16.txt"
  bench bf16-exact /tmp/demo-bf16 --exact
  bench bf16-normal /tmp/demo-bf16
  bench f32-exact $demo/target --exact
  bench f32-normal $demo/target
  timeout 60 $py -m mlx_specdec doctor --model $demo/target --json "$out/doctor-f32.json" > "$out/doctor-f32.txt" 2>&1
  echo "doctor f32: rc $?"; tail -n 30 "$out/doctor-f32.txt"
else
  timeout 400 $py scripts/gpu_exactness.py --shape qwen3-4b --bits 8 --prompts 50 \
    --json "$out/synthetic-8bit.json" 2>&1 | tee "$out/synthetic-8bit.txt" | tail -n 60
  timeout 150 $py scripts/gpu_exactness.py --shape qwen3-4b --bits 4 --skip outputs \
    --json "$out/synthetic-4bit.json" 2>&1 | tee "$out/synthetic-4bit.txt" | tail -n 40
fi
