#!/usr/bin/env bash
# Build .wheels/unsloth/: Unsloth and the packages it imports that the GPU machine's image lacks,
# unpacked (no install step there: put the folder on PYTHONPATH), pruned to what a LoRA run on
# CUDA 13 loads, so the call's tree + carry stays under 64 MiB. Prints the bundle's size.
#
#   bash bench/unsloth_bundle.sh            # needs PyPI (this machine), not the GPU machine
#
# The GPU image (device KINDS.md) already has torch 2.11 (cu130), transformers 5.17, peft,
# accelerate, triton 3.6, einops, sentencepiece, protobuf, pandas, pyarrow, xxhash, rich, typer,
# httpx...: those are NOT carried. Versions are pinned to what unsloth 2026.10.9 accepts there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=.wheels/unsloth
CACHE=${UNSLOTH_WHEEL_CACHE:-/tmp/unsloth-wheels}
PY=${PYTHON:-python3}
# wheels for CPython 3.12 on manylinux x86_64 (the GPU machine's Python)
PKGS=(
  unsloth==2026.10.9 unsloth_zoo==2026.10.9
  datasets==4.8.5 dill==0.4.0 multiprocess==0.70.18
  trl==1.15.0
  tyro==1.0.16 docstring-parser==0.18.0 typeguard==4.6.0 shtab==1.13.0
  torchao==0.18.0 cut-cross-entropy==25.1.1
  bitsandbytes==0.50.2 msgspec==0.22.0
)
mkdir -p "$CACHE"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$CACHE" "${PKGS[@]}"
rm -rf "$OUT"
mkdir -p "$OUT"
for spec in "${PKGS[@]}"; do
  name=${spec%%==*}; ver=${spec##*==}
  whl=$(ls "$CACHE"/*.whl | grep -i -E "/${name//[-_]/[-_]}-${ver}-" | grep -E -- '-(py3-none-any|py312-none-any|cp312-cp312-manylinux|py3-none-manylinux|cp3[0-9]+-abi3-manylinux)' | head -1)
  [ -n "$whl" ] || { echo "no wheel for $spec in $CACHE" >&2; exit 1; }
  unzip -q -o "$whl" -d "$OUT"
done
# What the GPU run never loads:
rm -rf "$OUT"/studio "$OUT"/unsloth_cli "$OUT"/bin           # Unsloth Studio web app + CLI
find "$OUT"/bitsandbytes -name 'libbitsandbytes_*.so' ! -name 'libbitsandbytes_cuda130.so' -delete  # other CUDA versions
find "$OUT"/torchao -name '*.so' -delete                        # optional prebuilt C++/CUDA ops (torchao falls back)
find "$OUT" -depth -type d \( -name tests -o -name test -o -name __pycache__ \) -exec rm -rf {} +
echo "bundle $OUT: $(du -sb "$OUT" | cut -f1) bytes ($(du -sh "$OUT" | cut -f1)), $(find "$OUT" -type f | wc -l) files"
