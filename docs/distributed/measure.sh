#!/usr/bin/env bash
# The measurements of the README's "Several processes and machines" section, on the CPU with gloo.
#
#   docs/distributed/measure.sh [output directory, default docs/distributed/results]
#   PARTS="4 5" docs/distributed/measure.sh     # only some of the parts below (default: 1 2 3 4 5 6)
#
# Every result file starts with the conditions it was taken under: date, `uptime` (the load),
# CPU cores, torch, processes and threads. Re-run it on quiet cores before publishing a time;
# the byte counts do not depend on the load.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-docs/distributed/results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
TORCHRUN=("$PY" -m torch.distributed.run --standalone)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
PARTS=${PARTS:-1 2 3 4 5 6}
# QUICK=1: few repetitions and steps (checks the pipeline; the timings are not for publishing)
if [[ -n "${QUICK:-}" ]]; then R1=(warmup=1 repetitions=3); R2=("${R1[@]}"); STEPS=10
else R1=(warmup=3 repetitions=15); R2=(warmup=2 repetitions=9); STEPS=100; fi
part() { [[ " $PARTS " == *" $1 "* ]]; }

conditions() {
    echo "<!-- $(date -Iseconds); uptime:$(uptime); $(nproc) cores; torch $("$PY" -c 'import torch; print(torch.__version__)'); $1 -->"
}

bench() {  # name, processes, then fwdgrad bench overrides
    local name=$1 processes=$2
    shift 2
    OMP_NUM_THREADS=1 "${TORCHRUN[@]}" --nproc_per_node="$processes" -m fwdgrad bench device=cpu "$@" \
        hydra.run.dir="$TMP/$name" > "$TMP/$name.log" 2>&1 || { cat "$TMP/$name.log"; exit 1; }
    { conditions "$processes processes x 1 thread; fwdgrad bench $*"
      cat "$TMP/$name/table.md"; } > "$OUT/$name.md"
    cp "$TMP/$name/bench.csv" "$OUT/$name.csv"
    cat "$OUT/$name.md"
}

# 1. data parallel, weight space, Baydin MLP (global batch 64): ms and bytes per step next to DDP backprop
if part 1; then
    bench data_parallel_baydin_mlp 2 distributed=data workloads=[baydin_mlp_64] methods=[fg,frog] ks=[1,16] \
        samplers=[normal,rank1] "${R1[@]}"
fi

# 2. tangent parallel FROG K=64, Baydin MLP: 2 processes x 1 thread against one process (2 threads, 1 thread)
if part 2; then
    bench tangent_parallel_frog64 2 distributed=tangent workloads=[baydin_mlp_64] methods=[frog] ks=[64] \
        samplers=[rank1,normal] "${R2[@]}"
fi

# 3. parameters bitwise identical after 100 steps; the first step against the one-process update
if part 3; then
    { conditions "2 processes x 1 thread"
      OMP_NUM_THREADS=1 "${TORCHRUN[@]}" --nproc_per_node=2 docs/distributed/identical_ranks.py "$STEPS" 2>/dev/null
    } | tee "$OUT/identical_ranks.md"
fi

# 4. metrics.csv of `fwdgrad train` (Baydin MLP, mnist5k, 2 epochs): 2 processes x 1 thread against 1 process
#    x 1 thread; as a control of the run's own floating-point sensitivity, 1 process x 2 threads (the same
#    arithmetic, summed in another order) against 1 process x 1 thread
if part 4; then
    { conditions "fwdgrad train distributed=data: 1 process x 1 thread, 2 processes x 1 thread, 1 process x 2 threads"
      for method in "gradient=frog gradient.num_tangents=16 gradient.sampler=rank1 lr=auto" "gradient=fg lr=2e-4"; do
          for run in "1 1" "2 1" "1 2"; do
              read -r processes threads <<< "$run"
              OMP_NUM_THREADS=$threads "${TORCHRUN[@]}" --nproc_per_node="$processes" -m fwdgrad train $method \
                  epochs=2 distributed=data progress=false tensorboard=false device=cpu \
                  run_dir="$TMP/train${processes}x$threads" > "$TMP/train.log" 2>&1 || { cat "$TMP/train.log"; exit 1; }
          done
          "$PY" docs/distributed/compare_metrics.py "$TMP/train1x1" "$TMP/train2x1" "$TMP/train1x2" "$method"
          rm -rf "$TMP"/train*
      done
    } | tee "$OUT/metrics_1_vs_2.md"
fi

# 5. what activity perturbation and backprop (DDP) send: the whole gradient
if part 5; then
    { conditions "fwdgrad train, 2 processes x 1 thread, 20 steps"
      for method in "gradient=fg gradient.num_tangents=16 gradient.perturbation=activity lr=1e-3" "gradient=bp lr=0.1"; do
          OMP_NUM_THREADS=1 "${TORCHRUN[@]}" --nproc_per_node=2 -m fwdgrad train $method epochs=1 \
              max_steps_per_epoch=20 max_eval_batches=1 distributed=data progress=false tensorboard=false device=cpu \
              run_dir="$TMP/gradients" > "$TMP/gradients.log" 2>&1 || { cat "$TMP/gradients.log"; exit 1; }
          "$PY" -c "import json; s = json.load(open('$TMP/gradients/summary.json')); \
print(f\"- \`$method\`: {s['parameters']:,} parameters, {s['bytes_per_step']:,.0f} bytes/step/process \
({s['bytes_per_step_by_category']}); {s['traffic']}\")"
          rm -rf "$TMP/gradients"
      done
    } | tee "$OUT/gradient_bytes.md"
fi

# 6. where a tangent-parallel step's time goes (one process, 1 and 2 threads): the pass over K, K/2, K/4
#    tangents and the aggregation/update over all K; the projected W-process step
if part 6; then
    { for threads in 1 2; do
          conditions "one process x $threads threads"
          OMP_NUM_THREADS=$threads "$PY" docs/distributed/tangent_parallel_breakdown.py 64 "$threads" 7
      done
    } | tee "$OUT/tangent_parallel_breakdown.md"
fi
