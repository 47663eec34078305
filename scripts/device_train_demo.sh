#!/usr/bin/env bash
# The demo model's training on the GPU machine (issue 11), as it was run: one NVIDIA H200 lent
# through the `device` tool, MLX 0.32.4 CUDA. Call 1 stashes .device/part1 under /root/stash;
# call 2 runs this script (with .device/part2 carried). It installs MLX, lays the tree out as the
# `framecast` package, and starts training in its own process session, so later calls can watch
# it (`scripts/device_train_demo.sh watch SECONDS`) while the machine stays warm. Usage:
#   bash scripts/device_train_demo.sh start TRAIN_SECONDS [watch SECONDS]   (then: watch SECONDS, as often as needed)
#   bash scripts/device_train_demo.sh install   (MLX and the package only: for a check before training, e.g.
#   PYTHONPATH=/tmp/pkg:/tmp/site python3 scripts/check_decoder_colour.py --workers 15)
# TRAIN_ARGS adds trainer options, e.g. TRAIN_ARGS="--init-from /tmp/pkg/framecast/demo_model --vision-phase 0"
# (the shipped model, as carried in the working tree) to fine-tune instead of starting afresh.
# TRAIN_ARGS_2, when set, starts a second run beside the first on the same GPU (/root/run2, its
# files under $OUT/run2), so one session can test two recipes; the 7 M-parameter model is small
# next to the card, but whether two runs slow each other is to be read from their step rates
# (not yet measured). The 15 data workers are split between them.
# The MLX CUDA wheel travels split in two (each call carries at most 64 MiB): build the halves here
# with ../shared/device/mlx-cuda-wheels.sh (see ../shared/device/README.md) into .device/part1 and
# .device/part2; call 1 (carry .device/part1): mkdir -p /root/stash && cp .device/part1/* /root/stash/
set -euo pipefail
usage() { echo "usage: [TRAIN_ARGS='trainer options'] [TRAIN_ARGS_2='a second run'] $0 start TRAIN_SECONDS [watch SECONDS] | watch SECONDS | install" >&2; exit 2; }
case "${1:-}" in start) [ $# -ge 2 ] || usage ;; watch) [ $# -ge 2 ] || usage ;; install) ;; *) usage ;; esac
for n in "${2:-0}" "${4:-0}"; do [[ "$n" =~ ^[0-9]+$ ]] || { echo "$0: '$n' is not a number of seconds" >&2; exit 2; }; done
RUN=/root/run RUN2=/root/run2
if [ "$1" = watch ] && [ ! -f $RUN/train.log ]; then
  echo "$0: no training started on this machine ($RUN/train.log is missing): run 'start' first" >&2; exit 2
fi
export PYTHONPATH=/tmp/pkg:/tmp/site PYTHONUNBUFFERED=1
if [ "$1" != watch ] && ! { ls /root/stash/*.part.aa && ls .device/part2/*.part.ab; } > /dev/null 2>&1; then
  echo "$0: '$1' runs on the GPU machine, after call 1 stashed .device/part1 in /root/stash, with .device/part2 carried" >&2
  exit 2
fi
if [ "$1" != watch ]; then  # install: MLX under /tmp/site, this tree as the framecast package under /tmp/pkg
  whl=$(basename .device/part2/*.part.ab .part.ab)
  cat /root/stash/*.part.aa .device/part2/*.part.ab > "/tmp/$whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "/tmp/$whl" .device/part2/*.whl \
    > /tmp/pip.log 2>&1 || { cat /tmp/pip.log >&2; exit 1; }
  grep -v "already exists" /tmp/pip.log || true  # a second install on one machine warns for every package
  rm -rf /tmp/pkg && mkdir -p /tmp/pkg
  cp -r pipeline /tmp/pkg/framecast && cp -r stages /tmp/pkg/framecast/stages && cp -r configs /tmp/pkg/framecast/configs
  python3 -c "import mlx.core as mx; print(mx.default_device(), flush=True)"
  [ "$1" = install ] && exit 0
fi
if [ "$1" = start ]; then
  # a run before this one on the same machine left logs that `watch` would read as this run's end
  rm -rf "$RUN" "$RUN2" && mkdir -p "$RUN"
  deadline=$(( $(date +%s) + $2 ))
  workers=15; [ -n "${TRAIN_ARGS_2:-}" ] && workers=7
  launch() {  # launch RUN_DIR TRAINER_OPTIONS: train, then evaluate, in its own process session
    mkdir -p "$1"
    setsid nohup bash -c "python3 -m framecast.stages.demo_training.train --out $1/model --ckpt $1/ckpt \
        --deadline $deadline --time-budget $2 --streams 1500 --frames 48 --max-clip 48 --workers $workers \
        --codec jpeg --log-every 100 --ckpt-every 150 $3 > $1/train.log 2>&1; echo TRAINED >> $1/train.log; \
        python3 -m framecast.stages.demo_training.evaluate --model $1/model --streams 12 --frames 120 \
        --codec jpeg --shuffled > $1/eval.log 2>&1; echo EVALUATED >> $1/eval.log" > /dev/null 2>&1 < /dev/null &
  }
  launch $RUN "$2" "${TRAIN_ARGS:-}"
  if [ -n "${TRAIN_ARGS_2:-}" ]; then launch $RUN2 "$2" "$TRAIN_ARGS_2"; fi
  shift 2
fi
if [ "${1:-}" = watch ]; then
  end=$(( $(date +%s) + $2 ))
  evaluated() { grep -q EVALUATED $RUN/eval.log 2>/dev/null && { [ ! -d $RUN2 ] || grep -q EVALUATED $RUN2/eval.log 2>/dev/null; }; }
  while [ "$(date +%s)" -lt "$end" ] && ! evaluated; do sleep 5; done
fi
report() {  # report RUN_DIR OUT_DIR TRAIN_TAIL EVAL_TAIL: the logs' ends here, logs and weights under OUT_DIR
  echo "== $1"
  tail -c "$3" $1/train.log || true
  tail -c "$4" $1/eval.log 2>/dev/null || true
  if [ -n "$2" ]; then
    mkdir -p "$2"
    cp $1/train.log $1/eval.log "$2"/ 2>/dev/null || true
    if [ -f $1/model/model.safetensors ]; then
      cp $1/model/model.safetensors $1/model/training.json "$2"/
      tar -C $1/model -cf "$2"/model_files.tar config.json preprocessor_config.json tokenizer.json \
          tokenizer_config.json generation_config.json
    fi
  fi
}
if [ -d $RUN2 ]; then
  report $RUN "${OUT:-}" 3500 1500
  report $RUN2 "${OUT:+$OUT/run2}" 3500 1500
else
  report $RUN "${OUT:-}" 6000 3000
fi
