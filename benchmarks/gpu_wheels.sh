#!/usr/bin/env bash
# Download, on a CPU machine with registry access, exactly the wheels the GPU machine lacks for
# benchmarks/gpu_check.py, for CPython 3.12 / manylinux x86_64, into the ignored folder .gpu_wheels/.
#
# The GPU machine already has torch 2.11 (CUDA), transformers 5.17, triton 3.6, tokenizers 0.23, safetensors
# 0.8, huggingface-hub 1.33 (with httpx), pyyaml, numpy, pandas, pyarrow, xxhash, fsspec, tqdm, requests, einops,
# matplotlib (the device notes' package list). What it lacks: this package, NeMo AutoModel 0.7.0, and what importing
# `nemo_automodel.recipes.llm.train_dspark` and `datasets` pulls in beyond that list (found with `python -X
# importtime`). nemo_automodel 0.7.0 does not import with transformers 5.17 (`cannot import name 'resolve_revision'
# from 'transformers.utils.hub'`), so transformers 5.18.0 travels too; it imports with the machine's
# huggingface-hub 1.33 (checked on CPU). Every wheel is fetched with --no-deps: torch and triton stay as they are.
#
#   bash benchmarks/gpu_wheels.sh            # then copy .gpu_wheels/ along and run the printed install line there
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=.gpu_wheels
LIMIT_MIB=64
# One version of each, the ones this package is tested with on CPU (two versions of one name stop the install).
WHEELS=(
    nemo_automodel==0.7.0
    transformers==5.18.0
    datasets==5.2.0
    dill==0.4.1
    multiprocess==0.70.19
    megatron-fsdp==0.5.0
    torchao==0.18.0
    torchdata==0.11.0
    pydantic==2.13.4
    pydantic-core==2.46.4
    typing-inspection==0.4.2
    annotated-types==0.7.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
    manylinux2014_x86_64 manylinux1_x86_64)

rm -rf "$OUT"
mkdir -p "$OUT"
python3 -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT" . >/dev/null
platform_args=()
for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platform_args[@]}" --dest "$OUT" "${WHEELS[@]}"

size_kib=$(du -sk "$OUT" | cut -f1)
echo "wheels in $OUT ($((size_kib / 1024)) MiB, limit ${LIMIT_MIB} MiB):"
ls -1 "$OUT"
if ((size_kib > LIMIT_MIB * 1024)); then
    echo "error: $OUT is $((size_kib / 1024)) MiB, over the ${LIMIT_MIB} MiB that may travel to the GPU machine" >&2
    exit 1
fi
echo
echo "install line (run first on the GPU machine, from the repository root):"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade" \
    "--find-links $OUT --target /tmp/site $OUT/*.whl && export PYTHONPATH=/tmp/site"
