#!/usr/bin/env bash
# Every GPU check and benchmark, in parts sized for a short device lease; run from the repository root.
#
#   bash bench/run_gpu.sh                 # all parts: check moe dense strategies fit ep (about 12 minutes on one H100)
#   bash bench/run_gpu.sh check moe       # a 15-minute lease: these two in one call ...
#   bash bench/run_gpu.sh dense strategies  # ... these two in the next ...
#   bash bench/run_gpu.sh fit             # ... and this one last
#   bash bench/run_gpu.sh ep              # on a machine with 2 or more GPUs, a call of its own
#
# Parts: check (bench/gpu_check.py: kernels against references, no host syncs, MoE layer and attention timings),
# moe and dense (bench/train_speed.py --config moe-bench / dense-bench: ours against HF transformers, eager and
# compiled, tokens/s and MFU), strategies (bench/strategies_gpu.py: FSDP and DeepSpeed against one device, in fp32
# and in bf16-mixed), fit (the quickstart through the real `fit` command with configs/trainer/gpu.yaml on one GPU:
# bf16-mixed, fused AdamW, clipping; needs jsonargparse, datasets and their dependencies, which the device image
# lacks: carry wheels), ep (bench/ep_speed.py: moe-bench under FSDP2 against FSDP2 + expert parallelism 2, 4, 8 on
# every GPU, bf16-mixed: tokens/s, MFU, peak memory, all-to-all imbalance; with fewer than 2 GPUs it writes a skip
# record and passes in seconds; not yet timed on GPUs, each layout is limited to 180 s and the part to 540 s).
# The fit part needs packages the device image lacks: run `bash bench/device_wheels.sh` here first and carry .whl/
# (installed below, before any part runs, when it is present).
# Results go to $OUT when it is set (the device tool's output folder), else bench/results; each part has its own
# time limit, so one that hangs or fails leaves the others' results.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH=.
py=$(command -v python3 || command -v python)
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(check moe dense strategies fit ep)
for part in "${parts[@]}"; do
  case "$part" in
    check | moe | dense | strategies | fit | ep) ;;
    *) echo "unknown part '$part' (parts: check moe dense strategies fit ep)" >&2; exit 2 ;;
  esac
done

if [ -d .whl ]; then  # bench/device_wheels.sh: jsonargparse, datasets, torchdata and what they need
  # A failed install costs only the fit part, which then names the missing package; the other parts still run.
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=.:/tmp/site || echo "installing the wheels in .whl/ failed (see above)" >&2
fi

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  "$py" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda);
print('transformers', transformers.__version__, 'lightning', lightning.__version__)" 2>&1 || true
} | tee "$out/gpu_environment.txt"

failed=()
run() {  # run LIMIT_SECONDS NAME COMMAND...: the command's output in $out/NAME.log, its tail on screen
  local limit=$1 name=$2
  shift 2
  echo "=== $name (limit ${limit}s) ==="
  local start=$SECONDS
  # -k: a process that ignores SIGTERM (stuck in a CUDA call) is killed 15 s later, so the next part still runs.
  timeout -k 15 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -e "Loading weights" -e "^$" "$out/$name.log" | tail -n 40
  echo "=== $name: exit $rc after $((SECONDS - start))s ==="
  [ "$rc" -eq 0 ] || failed+=("$name (exit $rc)")
}

for part in "${parts[@]}"; do
  case "$part" in
    check) run 200 gpu_check "$py" bench/gpu_check.py --out "$out/gpu_check.json" ;;
    moe) run 300 train_speed_moe-bench "$py" bench/train_speed.py --config moe-bench \
      --out "$out/train_speed_moe-bench.json" ;;
    dense) run 240 train_speed_dense-bench "$py" bench/train_speed.py --config dense-bench \
      --out "$out/train_speed_dense-bench.json" ;;
    strategies)
      run 200 strategies_gpu "$py" bench/strategies_gpu.py --results "$out/strategies_gpu.json"
      run 200 strategies_gpu_bf16 "$py" bench/strategies_gpu.py --precision bf16-mixed \
        --results "$out/strategies_gpu_bf16.json" ;;
    fit) run 200 fit_bf16_mixed "$py" cli.py fit --config configs/model/tiny-moe.yaml \
      --config configs/data/stdlib.yaml --config configs/trainer/gpu.yaml --config configs/experiment/quickstart.yaml \
      --trainer.devices 1 --trainer.max_steps 100 --trainer.val_check_interval 50 \
      --trainer.logger.init_args.save_dir "$out/runs" ;;
    ep) run 540 ep_speed "$py" bench/ep_speed.py --results "$out/ep_speed.json" ;;
  esac
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" >&2
  exit 1
fi
