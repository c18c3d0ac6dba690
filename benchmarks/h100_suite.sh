#!/usr/bin/env bash
# One scripted H100 run (the lent device's jax image; see benchmarks/results/h100/README.md):
# the cuDNN attention parity test, then Qwen3-4B-shaped SFT/GRPO steps, most important first, each
# result written as soon as it exists so a run cut short still returns what it measured.
#   OUT=/some/dir bash benchmarks/h100_suite.sh [main|scale|remat]   # results in $OUT/h100/
set -u
R="${OUT:?set OUT to an empty directory}/h100"; mkdir -p "$R"
export PYTHONPATH="$PWD/.gpu_pkgs${PYTHONPATH:+:$PYTHONPATH}"  # ml_collections, absent from the image
export LITELLM_LOCAL_MODEL_COST_MAP=True
log() { echo "[$(date +%T)] $*" | tee -a "$R/suite.log"; }
step() {  # step NAME TIMEOUT_S ARGS...: one train_step.py --mfu run into $R/NAME.json
  local name=$1 t=$2; shift 2
  log "start $name: $*"
  timeout "$t" python benchmarks/train_step.py --mfu --iters 3 --out "$R/$name.json" "$@" >>"$R/suite.log" 2>&1
  log "end $name rc=$?"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$R/suite.log"
python -c "import jax, jaxlib; print('jax', jax.__version__, jax.devices())" 2>&1 | tee -a "$R/suite.log"
case "${1:-main}" in
main)  # parity, then cuDNN beside Pallas flash, remat policies, GRPO
  log "attention parity tests"
  # fp32 tests compare at 1e-5: full fp32 matmuls, not the GPU's default TF32
  JAX_DEFAULT_MATMUL_PRECISION=highest JAX_PLATFORMS=cuda,cpu timeout 150 python -m pytest -q -p no:cacheprovider tests/test_qwen3_model.py \
    -k "cudnn or flash or segment" >"$R/attention_tests.log" 2>&1; log "tests rc=$?"; tail -3 "$R/attention_tests.log" | tee -a "$R/suite.log"
  step sft_cudnn_16l 150 --layers 16 --attn-impl cudnn
  step sft_flash_16l 150 --layers 16 --attn-impl flash
  step sft_cudnn_16l_dots 150 --layers 16 --attn-impl cudnn --remat dots
  step grpo_cudnn_16l 150 --layers 16 --attn-impl cudnn --grpo
  ;;
scale)  # all 36 layers (batch as memory allows), then step time over sequence length x batch
  step sft_cudnn_36l 150 --layers 36 --attn-impl cudnn --max-batch 2
  # the compile-time memory estimate can pass and the first step still not fit (fragmentation): one row
  [ -f "$R/sft_cudnn_36l.json" ] || step sft_cudnn_36l 150 --layers 36 --attn-impl cudnn --max-batch 1
  step sft_cudnn_16l_seq2048 100 --layers 16 --attn-impl cudnn --seq-len 2048 --max-batch 16
  step sft_cudnn_16l_seq8192 100 --layers 16 --attn-impl cudnn --seq-len 8192 --max-batch 4
  step sft_cudnn_16l_seq16384 100 --layers 16 --attn-impl cudnn --seq-len 16384 --max-batch 2
  step sft_cudnn_16l_b2 100 --layers 16 --attn-impl cudnn --max-batch 2
  ;;
remat)  # remat=attn (keeps projections and the attention kernel's outputs) beside full, same run
  step sft_cudnn_16l_full 100 --layers 16 --attn-impl cudnn --remat full
  step sft_cudnn_16l_attn 100 --layers 16 --attn-impl cudnn --remat attn
  step grpo_cudnn_16l_attn 100 --layers 16 --attn-impl cudnn --remat attn --grpo
  step sft_cudnn_16l_attn_seq8192 100 --layers 16 --attn-impl cudnn --remat attn --seq-len 8192 --max-batch 4
  ;;
*) echo "usage: $0 [main|scale|remat]"; exit 2 ;;
esac
log done
