#!/usr/bin/env bash
# CUDA speed benchmark: DiT-B/2 route (2,8,0.5) and DiT-XL/2 route (2,20,0.5), 32x32x4 latents,
# bf16 autocast, batch 32, eager then torch.compile. One JSON file per run goes to $1
# (default results/gpu); PYTHON picks the interpreter (default python3).
# Seen on one H100 (torch 2.11): DiT-B/2 eager ~20 s, DiT-XL/2 eager ~25 s, DiT-B/2 compiled
# ~150 s (inductor compiles 3 arms, 30-50 s each). Compiled runs are last: set COMPILE=0 to skip them.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
out="${1:-results/gpu}"
py="${PYTHON:-python3}"
mkdir -p "$out"
common=(--device cuda --input-size 32 --dtype bfloat16 --batch 32 --steps 7 --warmup 2)
modes=(eager)
[[ "${COMPILE:-1}" == 1 ]] && modes+=(compiled)
for mode in "${modes[@]}"; do
  flag=(); [[ "$mode" == compiled ]] && flag=(--compile)
  for spec in "DiT-B/2 2,8,0.5" "DiT-XL/2 2,20,0.5"; do
    read -r backbone route <<<"$spec"
    tag="$(echo "$backbone" | tr -d '/' | tr 'A-Z' 'a-z')-$mode"
    "$py" -m routefx.bench --backbone "$backbone" --routes "$route" "${common[@]}" ${flag[@]+"${flag[@]}"} \
      --json "$out/$tag.json"
  done
done
