#!/usr/bin/env bash
# CUDA speed benchmark: DiT-B/2 route (2,8,0.5) and DiT-XL/2 route (2,20,0.5), 32x32x4 latents,
# bf16 autocast, batch 32, both eager, then both torch.compile'd, all in ONE python process (torch,
# CUDA and inductor's compile workers are set up once; models are initialised on the GPU). Each run
# writes its JSON to $1 (default results/gpu) as soon as it ends, e.g. dit-b2_2-8-0.5_eager.json.
# PYTHON picks the interpreter (default python3); COMPILE=0 skips the compiled runs. Inductor's FX
# graph and autograd caches are forced on: a second run on the same machine skips most compiling.
# Time, measured (one H100, torch 2.11, the previous version: one process per run): eager ~20-25 s
# per run; DiT-B/2 compiled ~150 s (3 arms compiled cold, 49 + 44 + 29 s); DiT-XL/2 compiled still
# compiling after ~3 min. This version is NOT yet timed on a GPU. Estimate, cold caches: eager runs
# ~35 s together, DiT-B/2 compiled ~140 s, DiT-XL/2 compiled 3-5 min: about 6-8 min in all.
# Usage: bash benchmarks/gpu.sh [OUT_DIR]
set -euo pipefail
out="${1:-results/gpu}"
py="${PYTHON:-python3}"
modes=(eager)
[[ "${COMPILE:-1}" == 1 ]] && modes+=(compiled)
export TORCHINDUCTOR_FX_GRAPH_CACHE="${TORCHINDUCTOR_FX_GRAPH_CACHE:-1}"
export TORCHINDUCTOR_AUTOGRAD_CACHE="${TORCHINDUCTOR_AUTOGRAD_CACHE:-1}"
"$py" -m routefx.bench --run DiT-B/2:2,8,0.5 --run DiT-XL/2:2,20,0.5 --modes "${modes[@]}" \
  --device cuda --input-size 32 --dtype bfloat16 --batch 32 --steps 7 --warmup 2 --json-dir "$out"
