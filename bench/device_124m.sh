#!/usr/bin/env bash
# The 124M pipeline and the GPU benchmarks on the device machine, across several device calls.
# One call may run 10 minutes and the machine stays ours while calls follow each other within its
# idle limit, so the pipeline runs detached (setsid) from a frozen copy of the tree while later
# calls poll it and then benchmark. Everything it writes lives under /tmp/pdt on that machine.
#   call 1: bash bench/device_124m.sh launch [presets...]   # wheels, pipeline launched, then gpu tests
#           (never pipe `launch`: the detached pipeline holds the pipe open until it ends;
#            SKIP_GPU_TESTS=1 skips the tests)
#   call 2: bash bench/device_124m.sh poll 560             # poll (prints the log's tail)
#   call 3: bash bench/device_124m.sh measure                # decode, NLL breakdown, curriculum -> $OUT
#   or calls 2+3 as one: bash bench/device_124m.sh finish 300  # poll up to 300 s, then measure
#   SET="preset:field.path=json ..." with launch: change the copied presets (e.g. fewer steps); a
#       preset that does not exist is created, so a variant trains beside the shipped one:
#       SET='stage3_124m_h3:extends="stage3_124m.json" stage3_124m_h3:train.heads_lr_scale=3'
#       then `launch ... stage3_124m stage3_124m_h3` and `STAGES="stage3_124m stage3_124m_h3" measure`
#       (`launch ... stage2_124m stage3_124m+stage3_124m_h3` trains the two at once)
#   COMPARE=1 with finish/measure: then `compare` (this tree against .device/old, same machine)
#   PARTS=linears with finish/measure: then bench/decode_parts.py for those parts
#   BREAKDOWN=1 with finish/measure: bench/redundancy_breakdown.py for each stage too (the bus taken apart),
#       the stages at once after the timed decode benches; BREAKDOWN_PROMPTS its prompt count;
#       DECODE_STAGES="stage3_124m": only these stages get the (timed) decode bench
#   PROFILE=1 (PROFILE_HOST=1) with finish/measure: bench/profile_gpu.py's decode profile -> $OUT/profile.txt
#   AB=PDT_BENCH_ROUND_GRAPH bash bench/device_124m.sh ab: that knob 0 / 1 alternated, ROUNDS times
#       (AB_VALUES="0 128" for other values)
# Wheels: `bash bench/device_setup.sh prepare` here first; name `.whl` in the call's `carry`.
# PDT_CODE_VERSION=<this checkout's short sha> before the command: the records name that commit (the
#   device copy's own git is the session's first commit, so they would read <that>.dirty).
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
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    if [ -f $W/pipeline.log ] && [ ! -f $W/pipeline.done ]; then echo "a pipeline is already running"; exit 0; fi
    rm -rf $W/src && mkdir -p $W/src && cp -r main.py pdt presets pyproject.toml $W/src/
    rm -f $W/pipeline.done
    mkdir -p $W/src/bench && cp bench/device_124m.sh bench/device_setup.sh $W/src/bench/ && cp -r .whl $W/src/
    # SET="stage3_124m:train.steps=1000 ...": change a copied preset's field (a shorter run when
    # device time is short; what was changed is printed and lands in each run's saved preset)
    for kv in ${SET:-}; do
      python3 - "$W/src/presets" "$kv" <<'PY'
import json, sys
from pathlib import Path
name, rest = sys.argv[2].split(":", 1)
dotted, value = rest.split("=", 1)
path = Path(sys.argv[1]) / f"{name}.json"
data = json.loads(path.read_text()) if path.exists() else {"name": name}  # new: a variant
node = data
*parents, leaf = dotted.split(".")
for key in parents:
    node = node.setdefault(key, {})
node[leaf] = json.loads(value)
path.write_text(json.dumps(data, indent=2))
print(f"preset {name}: {dotted} = {value}")
PY
    done
    # setsid: a new process session outlives this call (the device kills what a call leaves behind)
    (cd $W/src && setsid bash bench/device_124m.sh _pipeline "${presets[@]}" > $W/pipeline.log 2>&1 < /dev/null &)
    sleep 5; cat $W/pipeline.log
    # the GPU tests while the pipeline builds its dataset and pretrains (correctness, not timings)
    [ "${SKIP_GPU_TESTS:-0}" = 1 ] || python3 -m pytest -q -m gpu -p no:cacheprovider tests/kernels tests/model 2>&1 | tee "$OUT/gpu_tests.txt" | tail -5 ;;
  _pipeline)  # (run by launch, detached, from the frozen copy in $W/src)
    shift
    # an argument "a+b" runs presets a and b at once, each its own process on the one GPU (stage-3
    # variants beside each other: a small stage leaves the GPU mostly idle; the caches they share
    # are written atomically), and the next argument waits for both
    for group in "$@"; do
      t0=$(date +%s)
      pids=()
      for p in ${group//+/ }; do
        echo "=== $p start $(date +%T)"
        PDT_PRESET=$p python3 main.py > "$W/$p.log" 2>&1 &
        pids+=("$p:$!")
      done
      failed=""
      for entry in "${pids[@]}"; do
        p=${entry%%:*}
        wait "${entry##*:}"; rc=$?
        echo "=== $p rc=$rc $(( $(date +%s) - t0 )) s"
        tail -3 "$W/$p.log"
        [ $rc -ne 0 ] && failed="$failed $p"
      done
      [ -n "$failed" ] && { echo "failed:$failed" > $W/pipeline.done; exit 1; }
    done
    echo ok > $W/pipeline.done ;;
  poll)
    limit=${2:-560}; t0=$(date +%s)
    while [ ! -f $W/pipeline.done ] && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 10; done
    cat $W/pipeline.log; echo "--- done: $(cat $W/pipeline.done 2>/dev/null || echo running)" ;;
  measure)
    cp $W/pipeline.log "$OUT/" 2>/dev/null
    cp $W/src/presets/*.json presets/  # the presets as launched (SET changes, variants)
    stages=(${STAGES:-stage3_124m})
    dirs=()
    for s in "${stages[@]}"; do  # each stage's metrics and γ (the first stage's to $OUT itself)
      dir=$OUT; [ ${#dirs[@]} = 0 ] || dir=$OUT/$s; mkdir -p "$dir"; dirs+=("$dir")
      grep -E "auc|gamma|coverage|lm_ce|readiness|_gain|sibling" "$W/$s.log" | tail -32 > "$dir/$s.tail.txt" 2>/dev/null
      for f in report.json calibration.json; do  # the stage-3 export's metrics and γ
        src=$(find $W/checkpoints/$s -name "$f" | head -1)
        [ -n "$src" ] && cp "$src" "$dir/${s}_$f"
      done
    done
    # the timed decode bench, one stage at a time, alone on the GPU (DECODE_STAGES: only these)
    for i in "${!stages[@]}"; do
      s=${stages[$i]}
      case " ${DECODE_STAGES:-${stages[*]}} " in *" $s "*) ;; *) continue ;; esac
      echo "=== decode: $s"
      OUT=${dirs[$i]} PDT_BENCH_STAGE=$s python3 bench/decode_speedup.py 2>&1 | tail -30
    done
    # BREAKDOWN=1: where each stage's redundancy comes from (notes, snapshot 0, the protocol). No
    # timings, so the stages run at once, each to its own folder and log (BREAKDOWN_PROMPTS: its own
    # prompt count, more than the timing run's for a smaller s.e.)
    if [ "${BREAKDOWN:-0}" = 1 ]; then
      pids=()
      for i in "${!stages[@]}"; do
        OUT=${dirs[$i]} PDT_BENCH_STAGE=${stages[$i]} PDT_BENCH_PROMPTS=${BREAKDOWN_PROMPTS:-${PDT_BENCH_PROMPTS:-10}} \
          python3 bench/redundancy_breakdown.py > "${dirs[$i]}/breakdown_${stages[$i]}.txt" 2>&1 &
        pids+=($!)
      done
      for i in "${!stages[@]}"; do
        wait "${pids[$i]}"
        echo "=== breakdown: ${stages[$i]}"; grep -v "^Loading" "${dirs[$i]}/breakdown_${stages[$i]}.txt" | tail -40
      done
    fi
    [ "${SKIP_NLL:-0}" = 1 ] || python3 bench/nll_breakdown.py 2>&1 | grep -E "nats|wrote"
    [ "${SKIP_CURRICULUM:-0}" = 1 ] || python3 bench/curriculum_throughput.py 2>&1 | tail -8
    # PROFILE=1: the decode profile (random-weight 124M) with each graph's kernels and, with
    # PROFILE_HOST=1, the host calls per decode step of PDT and sequential
    [ "${PROFILE:-0}" = 1 ] && PDT_PROFILE=decode PDT_PROFILE_KERNELS=1 PDT_PROFILE_HOST=${PROFILE_HOST:-0} \
      python3 bench/profile_gpu.py > "$OUT/profile.txt" 2>&1
    # PARTS=linears (or lm_head,skinny,...): decode-step parts in a graph, bench/decode_parts.py
    [ -n "${PARTS:-}" ] && PDT_PARTS=$PARTS python3 bench/decode_parts.py 2>&1 | tail -20
    [ "${COMPARE:-0}" = 1 ] && bash "$0" compare
    true ;;
  finish)  # poll, then measure once the pipeline is done
    bash "$0" poll "${2:-300}" | tail -3
    [ "$(cat $W/pipeline.done 2>/dev/null)" = ok ] && bash "$0" measure ;;
  engines)  # no pipeline: the GPU tests and both decode engines on a random-weight 124M trunk
    nvidia-smi --query-gpu=name --format=csv,noheader
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests/model/test_graph_decode.py 2>&1 | tee "$OUT/gpu_tests.txt" | tail -15
    PDT_BENCH_TRUNK=random PDT_BENCH_KS=${KS:-1,2,3,4,8} python3 bench/decode_speedup.py 2>&1 | tail -16 ;;
  compare)  # random-weight 124M, K = 3, cuda_graph: this tree and an older one (.device/old, carried)
    # beside it in the same call: git archive <commit> main.py pdt bench presets pyproject.toml | tar -x -C .device/old
    for i in $(seq "${ROUNDS:-2}"); do
      PDT_BENCH_TRUNK=random PDT_BENCH_KS=3 PDT_BENCH_ENGINES=cuda_graph python3 bench/decode_speedup.py 2>&1 | grep -E "^K=3"
      (cd .device/old && OUT=$OUT/old PDT_BENCH_TRUNK=random PDT_BENCH_KS=3 PDT_BENCH_ENGINES=cuda_graph \
        python3 bench/decode_speedup.py 2>&1 | grep -E "^K=3" | sed 's/^/old: /')
    done ;;
  ab)  # random-weight 124M, K = 3, cuda_graph: a bench knob alternated (AB=PDT_BENCH_ROUND_GRAPH)
    knob=${AB:?AB=<a PDT_BENCH_ knob, taking 0 or 1 unless AB_VALUES says>}
    for i in $(seq "${ROUNDS:-2}"); do
      for v in ${AB_VALUES:-0 1}; do
        dir="$OUT/ab-${knob#PDT_BENCH_}-$i-$v"  # one folder per knob, round and value: none overwritten
        mkdir -p "$dir"
        env "$knob=$v" OUT="$dir" PDT_BENCH_TRUNK=random PDT_BENCH_KS=3 PDT_BENCH_ENGINES=cuda_graph \
          python3 bench/decode_speedup.py 2>&1 | grep -E "^K=3|Error" | sed "s/^/$knob=$v: /"
      done
    done ;;
  *) echo "usage: bench/device_124m.sh launch|poll|finish|measure|engines|compare|ab" >&2; exit 2 ;;
esac
