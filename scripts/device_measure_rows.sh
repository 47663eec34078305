#!/usr/bin/env bash
# Issue 15's few-rows measurements on the GPU machine in one device call (~6-7 minutes), after
# `scripts/device_train_demo.sh start` installed MLX there: run it with
#   export PYTHONPATH=/tmp/pkg:/tmp/site; bash scripts/device_measure_rows.sh
# (SHAPES=tiny for a smoke run on a CPU; PYTHON names the interpreter, default python3). Each part
# runs under its own timeout and writes under $OUT as it goes, so a part that runs out of time
# loses only itself:
#   1. bench_kernels --op quantized_rows: MLX's op, pad16 and our kernel for 1-64 rows;
#   2. bench_streams at 4 bits, 8 streams, FRAMECAST_QMM_ROWS=mlx and =pad-large alternated twice
#      (two processes per setting: on this VM's CPU, where both settings run the same code, two
#      runs of one setting differed by up to 28 % in tok/s at tiny shapes).
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/measure_rows}
shapes=${SHAPES:-real}
mkdir -p "$out"
echo "== bench_kernels --op quantized_rows"
# fp16 only by default: all three dtypes took 170 s for the first shape alone (first-use set-up of
# every shape and kernel instance), 2026-12-01; DTYPES="float16 bfloat16 float32" for all
dt=""; for d in ${DTYPES:-float16}; do dt="$dt --dtype $d"; done
timeout "${KERNELS_S:-170}" "${PYTHON:-python3}" scripts/bench_kernels.py --op quantized_rows --iters "${ITERS:-20}" $dt \
  > "$out/bench_qmm_rows.txt" 2>&1
grep -v "dequant" "$out/bench_qmm_rows.txt" | tail -n 45
for round in 1 2; do
  # mlx against pad-large by default (pad: 3 runs over two sessions, 140-146 tok/s against mlx's
  # 118-130); MODES="mlx pad-large pad kernel" for more (each ~1 minute a round)
  for mode in ${MODES:-mlx pad-large}; do
    echo "== bench_streams, FRAMECAST_QMM_ROWS=$mode, round $round"
    FRAMECAST_QMM_ROWS=$mode timeout "${STREAMS_S:-100}" "${PYTHON:-python3}" scripts/bench_streams.py --shapes "$shapes" \
      --bits 4 --streams 8 --ticks 10 > "$out/streams_${mode}_$round.txt" 2>&1
    tail -n 3 "$out/streams_${mode}_$round.txt"
  done
done
