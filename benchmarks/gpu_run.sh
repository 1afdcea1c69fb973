#!/usr/bin/env bash
# Every GPU check in one call, for a lent GPU machine that has torch but no network
# (benchmarks/README.md, "On a GPU"). Wheels of what that machine lacks (open_clip_torch, ftfy,
# wcwidth, diffusers, importlib_metadata, lazy-importer) are expected in .whl/. Results go to
# $OUT (at most 8 files): gpu.txt, tests.log, bench_*.json, train.json, log.txt.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh                 # everything (about 6 minutes on an H100, plus the
#                                                           # speed stage, cut at 150 s)
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh bench compile   # some stages: tests, bench, speed, train, compile
#   TESTS="-k samples_equal" bash benchmarks/gpu_run.sh tests  # pytest arguments for the tests stage
set -u
STAGES=${*:-tests bench speed train compile}
want() { [[ " $STAGES " == *" $1 "* ]]; }
export OUT=${OUT:-/tmp/minidiff-gpu}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1
step() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

step "install"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >>"$LOG" 2>&1 || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . -e plugins/minidiff-solvers \
  ./tests/plugin_dist >>"$LOG" 2>&1 || { echo "minidiff install failed" | tee -a "$LOG"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
python3 -c "import torch, diffusers, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, \
diffusers.__version__, torch.cuda.get_device_name())" >>"$OUT/gpu.txt" 2>&1
nproc >>"$OUT/gpu.txt"

if want tests; then
step "CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py "tests/test_unet.py::test_runs_on_cuda_like_on_cpu" \
  ${TESTS:-} >"$OUT/tests.log" 2>&1
tail -3 "$OUT/tests.log" | tee -a "$LOG"
fi

if want bench; then
step "benchmark: float32"
timeout 120 python3 benchmarks/bench_vs_diffusers.py --device cuda --no-cli --json >"$OUT/bench_fp32.json" 2>>"$LOG"
step "benchmark: bf16 autocast, with the CLI timings"
timeout 150 python3 benchmarks/bench_vs_diffusers.py --device cuda --autocast bf16 --json \
  >"$OUT/bench_bf16.json" 2>>"$LOG"
fi

if want speed; then
step "training steps/s of the emoji recipe: per-step sync (before) against deferred, bf16, compile, CUDA graphs"
# Writes its JSON after each pass (batch 32, the compiled variants at 32, then 256 and 1024), so the
# timeout keeps what was measured; its table goes to the log.
timeout ${SPEED_TIMEOUT:-150} python3 benchmarks/bench_train_speed.py --device cuda \
  --out "$OUT/bench_train_speed.json" >>"$LOG" 2>&1
fi

if want train; then
step "training: clip stage, then 300 steps of the shipped recipe in float32 and in bf16"
timeout 120 python3 -m minidiff_cli clip train --data shapes --out /tmp/clip.safetensors --device cuda >>"$LOG" 2>&1
for mp in no bf16; do
  timeout 120 python3 -m minidiff_cli train --config recipes/shapes-clip.toml --clip-weights /tmp/clip.safetensors \
    --device cuda --threads 0 --mixed-precision $mp --max-steps 300 --save-every 1000 --sample-every 1000 \
    --log-every 25 --out /tmp/train-$mp >>"$LOG" 2>&1
done
python3 - >"$OUT/train.json" 2>>"$LOG" <<'EOF'
import json
out = {}
for mp in ("no", "bf16"):
    try:
        rows = [json.loads(line) for line in open(f"/tmp/train-{mp}/metrics.jsonl")]
    except OSError as exc:
        out[mp] = str(exc)
        continue
    # it_s is averaged from the run's start; steps a..b took b/it_b - a/it_a seconds.
    a, b = rows[len(rows) // 3], rows[-1]
    steady = (b["step"] - a["step"]) / (b["step"] / b["it_s"] - a["step"] / a["it_s"])
    out[mp] = {"it_s_from_start": b["it_s"], f"it_s_steps_{a['step']}_to_{b['step']}": steady,
               "final_loss": b["loss"], "steps": b["step"]}
print(json.dumps(out, indent=2))
EOF
cat "$OUT/train.json" | tee -a "$LOG"
fi

if want compile; then
step "benchmark: bf16 autocast + torch.compile (reduce-overhead: CUDA graphs)"
timeout ${COMPILE_TIMEOUT:-240} python3 benchmarks/bench_vs_diffusers.py --device cuda --autocast bf16 \
  --compile reduce-overhead --no-cli --json >"$OUT/bench_compile.json" 2>>"$LOG"
fi
step "done"
python3 - <<'EOF'
import json, os
for name in ("fp32", "bf16", "compile"):
    try:
        r = json.load(open(os.path.join(os.environ.get("OUT", "/tmp/minidiff-gpu"), f"bench_{name}.json")))
    except Exception as exc:
        print(name, "no result:", exc)
        continue
    s, t = r["sampling"], r["training"]
    print(f"{name:8s} sampling {s['minidiff']['median']:.3f}s vs {s['diffusers']['median']:.3f}s = "
          f"{r['sampling_ratio']:.2f}x; training {t['minidiff']['median'] * 1e3:.1f}ms vs "
          f"{t['diffusers']['median'] * 1e3:.1f}ms = {r['training_ratio']:.2f}x; generate {r.get('generate_s')}")
try:  # bench_train_speed's own table of its JSON (run from the repository root)
    import sys
    sys.path.insert(0, "benchmarks")
    from bench_train_speed import table
    print(table(json.load(open(os.path.join(os.environ.get("OUT", "/tmp/minidiff-gpu"), "bench_train_speed.json")))))
except Exception as exc:
    print("train speed no result:", exc)
EOF
