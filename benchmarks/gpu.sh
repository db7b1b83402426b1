#!/usr/bin/env bash
# CUDA speed benchmark: DiT-B/2 route (2,8,0.5) and DiT-XL/2 route (2,20,0.5), 32x32x4 latents,
# bf16 autocast, batch 32, fused AdamW. Each run writes its JSON to $1 (default results/gpu) as soon
# as it ends, e.g. dit-b2_2-8-0.5_regional.json.
#   1. both backbones eager, then both "regional" (every block compiled in place; the dense,
#      routefx and hand-written arms share one compiled block per token count), in ONE process;
#   2. DiT-B/2 with each arm torch.compile'd whole (three full fwd+bwd compiles), for comparison.
# WHOLE_XL=1 adds DiT-XL/2 to step 2 (several more minutes of compiling: three 28-block graphs);
# COMPILE=0 runs step 1 eager only. PYTHON picks the interpreter (default python3). Inductor's FX
# graph and autograd caches are forced on: a rerun on the same machine skips most compiling.
# Time: NOT yet measured with this layout. Measured before (one H100, torch 2.11): eager runs
# ~20-25 s each; DiT-B/2 whole-compiled ~150 s cold (three arms: 49 + 44 + 29 s). On 2 CPU cores
# (docs/results/speed.md) regional compiling of DiT-B/2 costs a fraction of the whole-model compile
# and does not grow with depth, so the estimate is ~35 s eager + ~1.5 min regional + ~2.5 min
# whole DiT-B/2: about 4.5 min in all.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
out="${1:-results/gpu}"
py="${PYTHON:-python3}"
common=(--device cuda --input-size 32 --dtype bfloat16 --batch 32 --steps 7 --warmup 2 --json-dir "$out")
export TORCHINDUCTOR_FX_GRAPH_CACHE="${TORCHINDUCTOR_FX_GRAPH_CACHE:-1}"
export TORCHINDUCTOR_AUTOGRAD_CACHE="${TORCHINDUCTOR_AUTOGRAD_CACHE:-1}"
modes=(eager)
[[ "${COMPILE:-1}" == 1 ]] && modes+=(regional)
"$py" -m routefx.bench --run DiT-B/2:2,8,0.5 --run DiT-XL/2:2,20,0.5 --modes "${modes[@]}" "${common[@]}"
[[ "${COMPILE:-1}" == 1 ]] || exit 0
whole=(--run DiT-B/2:2,8,0.5)
[[ "${WHOLE_XL:-0}" == 1 ]] && whole+=(--run DiT-XL/2:2,20,0.5)
"$py" -m routefx.bench "${whole[@]}" --modes compiled "${common[@]}"
