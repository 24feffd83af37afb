#!/usr/bin/env bash
# The GPU checks and the engine-bench runs behind benchmarks/RESULTS.md, on one CUDA machine.
#   TOKENIZER=path/to/tokenizer.json bash benchmarks/gpu_suite.sh [tests] [bench] [overhead] [memory] [devices]
# With no section named, all run (about 25 minutes on an H100-class card). Results go to $OUT (default bench-out).
# `random:gemma-2b` has random weights, so no download is needed; the tokenizer is the embedded model's
# (export it once on a machine with the package: see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TOKENIZER:?set TOKENIZER to a tokenizer.json}"
OUT=${OUT:-bench-out}
SECTIONS=${*:-tests bench overhead memory}  # devices (two or more GPUs) runs only when named
BENCH=(python -m engine_bench --model random:gemma-2b --tokenizer "$TOKENIZER" --device cuda --out "$OUT" --quiet)
has() { [[ " $SECTIONS " == *" $1 "* ]]; }

if has tests; then  # attention paths vs SDPA's math backend, teacher-forced logits vs HF, capture and steering in graphs
    ENGINE_GPU_TEST_TOKENIZER="$TOKENIZER" python -m pytest -q -m gpu tests -p no:cacheprovider -s
fi
if has bench; then  # the issue-4 ratios: all three systems, same card, same run
    "${BENCH[@]}" --workload short,long,varied --systems naive,hf,engine --num-prompts 512 --naive-prompts 4 \
        --batch-sizes 128,256,512 --max-num-seqs 512 --steering-specs 256 --steering-layers 4,8,12
fi
if has overhead; then  # steering (1 and 256 specs; 3 and all layers) and capture (4 layers, last_prompt) vs none
    "${BENCH[@]}" --workload short --systems engine --num-prompts 512 --max-num-seqs 512 --steering-specs 1,256 \
        --steering-layers 4,8,12 --capture-layers 4,8,12,16 --capture-positions last_prompt
    "${BENCH[@]}" --workload short --systems engine --num-prompts 512 --max-num-seqs 512 --steering-specs 1,256 \
        --steering-layers "$(seq -s, 0 17)"
    "${BENCH[@]}" --workload short --systems engine --num-prompts 512 --max-num-seqs 512 --steering-specs 1,256 \
        --steering-layers 6
fi
if has memory; then  # 20,000 prompts of up to 2,048 tokens inside half the card
    "${BENCH[@]}" --workload memory --systems engine --num-prompts 20000 --max-num-seqs 512 --gpu-memory-fraction 0.5
fi
if has devices; then  # one card and every card in the same run (rows engine, engine-Ndev); long enough to amortise start
    python -m engine_bench --model random:gemma-2b --tokenizer "$TOKENIZER" --out "$OUT" --quiet --devices all \
        --workload short --systems engine --num-prompts 8192 --max-num-seqs 512
fi
