#!/usr/bin/env bash
# The GPU check, ready for a machine with a CUDA device: the CUDA tests (pytest -m gpu), then featurize
# (bare backbone vs end to end, fp32 vs bf16, HOG in torch), attn_rnn training and beam decoding views/s,
# printed as one table (benchmarks/gpu_bench.py); then the map heads in bf16 against float32 (and across the GPUs
# when there are several: benchmarks/bench_ddp.py). About 5 minutes on one H200 + 16 cores; under 8.
#
#     bash benchmarks/gpu_check.sh            # PYTHON=... to choose the interpreter
#     bash benchmarks/gpu_check.sh --backbone resnet50,convnext_tiny   # featurize rows for these backbones
#
# Uses, in order: $PYTHON, .venv/bin/python (the Makefile's venv), python3. Missing packages are installed
# with pip into .venv-gpu (a venv that sees the system's torch), which needs a package index; without one
# it names what is missing and stops. Without a CUDA device it says so in one line and exits 1.
set -uo pipefail
backbone=resnet50
if [ "${1:-}" = "--backbone" ] && [ -n "${2:-}" ]; then backbone=$2
elif [ $# -gt 0 ]; then echo "gpu_check: usage: bash benchmarks/gpu_check.sh [--backbone NAME[,NAME...]]"; exit 2; fi
cd "$(dirname "$0")/.."
start=$SECONDS
say() { echo "gpu_check: $*"; }

if nvidia-smi -L 2>/dev/null | grep -q "^GPU"; then
  say "$(nvidia-smi -L | head -1), $(nproc) cores"
elif compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  say "$(compgen -G "/dev/nvidia[0-9]*" | wc -l) NVIDIA device(s) in /dev (no nvidia-smi), $(nproc) cores"
else
  say "no CUDA device on this machine (no GPU from nvidia-smi, no /dev/nvidia*): nothing measured"
  exit 1
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=.venv/bin/python
  else PY=python3; fi
fi
torch_info() { timeout 120 "$1" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())' 2>/dev/null; }
info=$(torch_info "$PY")
if [ -z "$info" ]; then
  say "$PY: no torch ($("$PY" --version 2>&1)); installing torch into .venv-gpu"
  "$PY" -m venv --system-site-packages .venv-gpu && PY=.venv-gpu/bin/python
  timeout 600 "$PY" -m pip install --quiet torch torchvision || { say "cannot install torch here: stopping"; exit 2; }
  info=$(torch_info "$PY")
fi
read -r torch_version cuda_version cuda_ok <<< "$info"
say "$PY: torch $torch_version, CUDA $cuda_version, torch.cuda.is_available() = $cuda_ok"
[ "$cuda_ok" = "True" ] || { say "torch sees no CUDA device: nothing measured"; exit 1; }

need='import h5py, skimage, sklearn, lightgbm, click, PIL, matplotlib, pytest'
if ! "$PY" -c "$need" 2>/dev/null; then
  missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in 'h5py skimage sklearn lightgbm click PIL matplotlib pytest'.split() if not u.find_spec(m)))")
  say "missing: $missing; pip install -e '.[test]' into .venv-gpu"
  [ -x .venv-gpu/bin/python ] || "$PY" -m venv --system-site-packages .venv-gpu
  PY=.venv-gpu/bin/python
  timeout 600 "$PY" -m pip install --quiet -e '.[test]' || { say "cannot install $missing here: stopping"; exit 2; }
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

say "CUDA tests (pytest -m gpu)"
timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -15
tests_rc=${PIPESTATUS[0]}

say "throughput (benchmarks/gpu_bench.py)"
timeout 400 "$PY" benchmarks/gpu_bench.py --device cuda --backbone "$backbone" 2>&1 | grep -v "^$"
bench_rc=${PIPESTATUS[0]}

say "map heads: bf16 autocast against float32 (val/test F2, epoch time), and DDP over the GPUs when several"
timeout 240 "$PY" benchmarks/bench_ddp.py --compare amp --device cuda --heads csra,mldecoder --channels 256 \
  --work "${TMPDIR:-/tmp}/imet-gpu-ddp" 2>&1 | grep -v "^$" || bench_rc=1
gpus=$("$PY" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 1)
if [ "${gpus:-1}" -gt 1 ]; then
  timeout 240 "$PY" benchmarks/bench_ddp.py --compare procs --procs "$gpus" --device cuda --heads csra,mldecoder \
    --channels 256 --work "${TMPDIR:-/tmp}/imet-gpu-ddp" 2>&1 | grep -v "^$" || bench_rc=1
fi

say "CUDA tests exit $tests_rc, benchmark exit $bench_rc, $((SECONDS - start)) s in all"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
