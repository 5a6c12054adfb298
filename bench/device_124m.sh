#!/usr/bin/env bash
# The 124M pipeline and the GPU benchmarks on the device machine, across several device calls.
# One call may run 10 minutes and the machine stays ours while calls follow each other within its
# idle limit, so the pipeline runs detached (setsid) from a frozen copy of the tree while later
# calls poll it and then benchmark. Everything it writes lives under /tmp/pdt on that machine.
#   call 1: bash bench/device_124m.sh launch [presets...]   # wheels, gpu tests, pipeline launched
#   call 2: bash bench/device_124m.sh poll 560             # poll (prints the log's tail)
#   call 3: bash bench/device_124m.sh measure                # curriculum + decode benchmarks -> $OUT
# Wheels: `bash bench/device_setup.sh prepare` here first; name `.whl` in the call's `carry`.
set -uo pipefail
W=/tmp/pdt
export PDT_DATA_DIR=$W/data PDT_CHECKPOINTS_DIR=$W/checkpoints PDT_LOGS_DIR=$W/logs PDT_HEADLESS=1
export PYTHONUNBUFFERED=1
# shellcheck source=/dev/null
source bench/device_setup.sh install >/dev/null
OUT=${OUT:-$W/out}
mkdir -p "$W" "$OUT"
PRESETS_DEFAULT=(dataset_wiki pretrain_124m stage0_124m stage1_124m stage2_124m stage3_124m)

case "${1:-}" in
  launch)
    shift
    if [ $# -gt 0 ]; then presets=("$@"); else presets=("${PRESETS_DEFAULT[@]}"); fi
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
    python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    python -m pytest -q -m gpu -p no:cacheprovider tests/model/test_graph_decode.py 2>&1 | tail -5
    if [ -f $W/pipeline.log ] && [ ! -f $W/pipeline.done ]; then echo "a pipeline is already running"; exit 0; fi
    rm -rf $W/src && mkdir -p $W/src && cp -r main.py pdt presets pyproject.toml $W/src/
    rm -f $W/pipeline.done
    (
      cd $W/src || exit 1
      export PYTHONPATH="/tmp/site:$W/src"
      for p in "${presets[@]}"; do
        t0=$(date +%s)
        echo "=== $p start $(date +%T)"
        PDT_PRESET=$p python main.py > "$W/$p.log" 2>&1
        rc=$?
        echo "=== $p rc=$rc $(( $(date +%s) - t0 )) s"
        tail -3 "$W/$p.log"
        [ $rc -ne 0 ] && { echo "failed: $p" > $W/pipeline.done; exit 1; }
      done
      echo ok > $W/pipeline.done
    ) > $W/pipeline.log 2>&1 < /dev/null &
    disown
    sleep 5; cat $W/pipeline.log ;;
  poll)
    limit=${2:-560}; t0=$(date +%s)
    while [ ! -f $W/pipeline.done ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 10; done
    cat $W/pipeline.log; echo "--- done: $(cat $W/pipeline.done 2>/dev/null || echo running)" ;;
  measure)
    cp $W/pipeline.log "$OUT/" 2>/dev/null
    for s in stage3_124m; do
      grep -E "auc|gamma|coverage|lm_ce|readiness" "$W/$s.log" | tail -25 > "$OUT/$s.tail.txt" 2>/dev/null
    done
    for f in report.json calibration.json; do  # the stage-3 export's metrics and γ
      src=$(find $W/checkpoints -path "*stage3_124m*" -name "$f" | head -1)
      [ -n "$src" ] && cp "$src" "$OUT/stage3_$f"
    done
    python bench/decode_speedup.py 2>&1 | tail -30
    [ "${SKIP_CURRICULUM:-0}" = 1 ] || python bench/curriculum_throughput.py 2>&1 | tail -8 ;;
  *) echo "usage: bench/device_124m.sh launch|poll|measure" >&2; exit 2 ;;
esac
