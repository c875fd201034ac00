#!/usr/bin/env bash
# Device check on one CUDA card, under 10 minutes in all (GPU tests 90 s, speed 170 s, race 330 s):
# bench/speed.py (issue 6) on the reference configuration, then the race (issue 11): the record
# preset's MDLM recipe against AR at equal wall-clock on the shared corpus, and the same recipe as
# encoder-decoder block diffusion in blocks of 2 (issues 14, 21: its FlexAttention block masks, compiled,
# on the card).
#
#   bash bench/gpu_check.sh          # JSON and logs go to $OUT when set, else to a temporary folder
#
# First the GPU tests (pytest -m gpu: FlexAttention block masks equal the SDPA masks), where pytest is.
#
# The race needs the shared corpus inside the checkout (../shared does not travel to the device):
#   mkdir -p .gpu_data && cp ../shared/data/docs_selected.jsonl ../shared/data/tokenizers/fineweb_1024_bpe.model .gpu_data/
# and `carry: [".gpu_data"]` (.gpu_data/ is git-ignored). RACE_SECONDS (default 50) is each recipe's
# training budget; RACE_ARGS adds flags to the race (RACE_ARGS="--preset tiny" tries it on a CPU).
#
# Runs, each under its own timeout and all under one deadline:
#   packed_compiled  reference config, packed layout, torch.compile + FlexAttention (+ a matmul peak)
#   docs_compiled    the same in docs layout (one PAD-filled document per row), fewer steps
#   packed_eager     no compile (SDPA with a materialized document mask), fewer steps
# then prints one table comparing them. bench/speed.py writes its JSON after training and again
# after evaluation, so a run cut short by its timeout still leaves its training figures.
# The package is used from src/ (PYTHONPATH): the device image has torch, numpy, sentencepiece and
# tqdm but no package index, so nothing is installed. GPU_CHECK_SECONDS (default 170) is the
# deadline; GPU_CHECK_ARGS adds flags to every run (GPU_CHECK_ARGS="--tiny --device cpu" tries the
# script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
RESULTS=${OUT:-$(mktemp -d)}
mkdir -p "$RESULTS"
timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
  || echo "nvidia-smi: not available"
timeout 60 "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__,
  "| cuda", torch.version.cuda, "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA")'
echo "git: $(git rev-parse --short HEAD 2>/dev/null || echo unknown) | results in $RESULTS"

failed=()
# FlexAttention's block masks against the SDPA masks the CPU tests check (documents, blocks, sub-tile blocks)
if "$PY" -c "import pytest" 2>/dev/null; then
  echo "== gpu tests: FlexAttention block masks vs SDPA masks"
  timeout -k 5 90 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_gpu.py \
    >"$RESULTS/gpu_tests.log" 2>&1 || failed+=("gpu tests (see gpu_tests.log)")
  tail -n 3 "$RESULTS/gpu_tests.log"
else
  echo "== gpu tests: skipped (no pytest on the device: carry a wheel of it to run tests/test_attention_gpu.py)"
fi

DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-170}))
bench() {  # NAME CAP_SECONDS ARGS...: one bench run, limited to min(CAP, time left before the deadline)
  local name=$1 cap=$2 left=$((DEADLINE - SECONDS))
  shift 2
  local limit=$((cap < left ? cap : left))
  if ((limit < 20)); then
    echo "== $name: skipped (${left}s left)"
    failed+=("$name (skipped)")
    return
  fi
  echo "== $name: bench/speed.py $* (timeout ${limit}s)"
  local rc=0
  # shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of extra flags (e.g. "--tiny --device cpu" to try it on a CPU)
  timeout -k 5 "$limit" "$PY" bench/speed.py --json "$RESULTS/$name.json" "$@" ${GPU_CHECK_ARGS:-} \
    >"$RESULTS/$name.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    local why="exit $rc"
    if ((rc == 124 || rc == 137)); then why="timed out after ${limit}s"; fi
    failed+=("$name ($why)")
    tail -n 25 "$RESULTS/$name.log"
  else
    sed -n '/^metric /,$p' "$RESULTS/$name.log"  # its table
  fi
}

bench packed_compiled 120 --layout packed --compile --steps 20 --warmup 3 --measure-peak
bench docs_compiled 50 --layout docs --compile --steps 10 --warmup 2 --eval-slices 4
bench packed_eager 30 --layout packed --no-compile --steps 10 --warmup 2 --eval-slices 2

"$PY" - "$RESULTS" <<'EOF'
import json, sys
from pathlib import Path

def fmt(r, key, scale=1.0, spec=",.0f"):
    return "-" if r.get(key) is None else format(r[key] * scale, spec)

runs = [p for name in ("packed_compiled", "docs_compiled", "packed_eager")
        if (p := Path(sys.argv[1]) / f"{name}.json").is_file()]
cols = ["run", "tok/s", "useful tok/s", "step ms", "MFU %", "peak GiB", "compile s", "eval tok-fwd/s",
        "val proj s", "breaks"]
rows = []
for path in runs:
    r = json.loads(path.read_text())
    rows.append([path.stem, fmt(r, "tokens_per_s"), fmt(r, "useful_tokens_per_s"), fmt(r, "step_ms_median", spec=".1f"),
                 fmt(r, "mfu", 100, ".1f"), fmt(r, "train_peak_memory_bytes", 2**-30, ".2f"),
                 fmt(r, "compile_s", spec=".0f"), fmt(r, "eval_token_forwards_per_s"), fmt(r, "val_projection_s"),
                 str(r.get("dynamo_graph_breaks", "-"))])
if runs:
    r = json.loads(runs[0].read_text())
    print(f"\n{r['device_name']} | torch {r['torch']} | {r['config'].split(', layout')[0]}")
    print(f"FLOPs/token: {r['flop_formula']}; MFU peak: {r['peak_flops_source']}")
    if r.get("matmul_flops_measured"):
        print(f"measured matmul: {r['matmul_flops_measured'] / 1e12:.3g} TFLOP/s "
              f"(MFU against it {100 * r['mfu_vs_measured']:.1f}%)")
widths = [max([len(c), *(len(row[i]) for row in rows)]) for i, c in enumerate(cols)]
for row in [cols, ["-" * w for w in widths], *rows]:
    print(" | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))))
EOF

# the race: best MDLM recipe (the record preset) vs AR vs blocks of 2 as an encoder and a tied one-layer
# decoder (issue 21: block diffusion's equal-token gain at 1.25x a plain step's FLOPs), equal wall-clock
DOCS=${GPU_DATA:-.gpu_data}
if [[ -f $DOCS/docs_selected.jsonl && -f $DOCS/fineweb_1024_bpe.model ]]; then
  RACE_SECONDS=${RACE_SECONDS:-50}
  echo "== race: record preset vs AR vs encoder-decoder blocks of 2, ${RACE_SECONDS}s of training each (compile and eval off the clock)"
  rc=0
  timeout -k 5 330 bash -c '
    "$0" -m mdlm_golf prepare --docs "$1/docs_selected.jsonl" --tokenizer "$1/fineweb_1024_bpe.model" \
      --val-docs 500 --out "$2/race_data" >/dev/null &&
    "$0" -m mdlm_golf race --data "$2/race_data" --out "$2/race" --preset record --recipe record: --recipe ar:objective=ar \
      --recipe block2-dec1-tied:block_size=2,decoder_layers=1,decoder_tied=true \
      --seeds 1 --max-wallclock "$3" --val-every 250 --eval-num-seqs 64 --elbo-steps 64 \
      --compile true $4' "$PY" "$DOCS" "$RESULTS" "$RACE_SECONDS" "${RACE_ARGS:-}" \
    >"$RESULTS/race.log" 2>&1 || rc=$?
  if ((rc != 0)); then
    failed+=("race (exit $rc)")
    tail -n 25 "$RESULTS/race.log"
  else
    sed -n '/^Base:/,/^wrote/p' "$RESULTS/race.log"
  fi
else
  echo "== race: skipped (no $DOCS/docs_selected.jsonl; see the header of this script)"
  failed+=("race (no data)")
fi

if ((${#failed[@]})); then
  echo "incomplete: ${failed[*]}"
  exit 1
fi
