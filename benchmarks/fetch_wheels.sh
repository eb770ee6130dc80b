#!/usr/bin/env bash
# Download the wheels benchmarks/e2e.py needs on the GPU machine into .whl/ (git-ignored), from this machine.
#
# The GPU image has torch 2.11.0+cu130 on Python 3.12 and no network; it lacks diffusers and torchao.
#   diffusers 0.42.1: pure Python. Its Requires-Dist (importlib_metadata, filelock, huggingface-hub>=1.32,
#     numpy, regex, requests, safetensors>=0.8, Pillow) are in the image except importlib_metadata, which
#     diffusers imports only on Python < 3.8 (diffusers/utils/import_utils.py), so it is not carried.
#   torchao 0.17.0: the release made with torch 2.11 (its __init__ loads the compiled extensions only on
#     torch >= 2.11; 0.18.0 has the same floor but was released after torch 2.12). One abi3 wheel for
#     Python >= 3.10; no non-extra Requires-Dist. The int8/fp8 dynamic configs the benchmark uses run on
#     torch._int_mm / torch._scaled_mm and Inductor, so they work even if an extension fails to load.
# Override with DIFFUSERS_VERSION=... TORCHAO_VERSION=... WHEEL_DIR=...
#
# On the GPU machine (carry: [".whl", "kernels_cuda/build"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD && python3 benchmarks/e2e.py ...
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=${WHEEL_DIR:-.whl}
DIFFUSERS_VERSION=${DIFFUSERS_VERSION:-0.42.1}
TORCHAO_VERSION=${TORCHAO_VERSION:-0.17.0}
# packages of the GPU image that the wheels' requirements may name (KINDS.md, "Python packages already there")
IMAGE_HAS="filelock huggingface-hub numpy regex requests safetensors pillow packaging tqdm pyyaml"

mkdir -p "$DEST"
# one version of each package: two versions in .whl stop the whole install
for pkg in diffusers torchao; do
  want=$([ "$pkg" = diffusers ] && echo "$DIFFUSERS_VERSION" || echo "$TORCHAO_VERSION")
  find "$DEST" -maxdepth 1 -name "${pkg}-*.whl" ! -name "${pkg}-${want}-*.whl" -print -delete
done

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$DEST" "diffusers==${DIFFUSERS_VERSION}" "torchao==${TORCHAO_VERSION}"

status=0
for whl in "$DEST"/diffusers-"$DIFFUSERS_VERSION"-*.whl "$DEST"/torchao-"$TORCHAO_VERSION"-*.whl; do
  [ -f "$whl" ] || { echo "missing: $whl" >&2; status=1; continue; }
  echo "== $(basename "$whl")"
  reqs=$(unzip -p "$whl" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    name=$(echo "$line" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr 'A-Z_.' 'a-z--')
    if echo " $IMAGE_HAS " | grep -q " $name "; then
      echo "   in the image: $line"
    elif [ "$name" = importlib-metadata ]; then
      echo "   not needed:   $line (imported only on Python < 3.8)"
    else
      echo "   NOT IN IMAGE: $line  -> download it too" >&2
      status=1
    fi
  done <<< "$reqs"
done
du -ch "$DEST"/*.whl | tail -n 1
exit $status
