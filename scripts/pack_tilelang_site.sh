#!/usr/bin/env bash
# Packs TileLang 0.1.15 and its dependencies into .tilelang-site.tar.xz (~41 MB), small enough to
# travel with one command to an offline GPU machine (the wheels themselves are 83 MB: xz packs the
# shared libraries far tighter than a wheel's deflate, and z3's duplicate library becomes a link).
# On the GPU machine: mkdir -p /tmp/site && tar -xJf .tilelang-site.tar.xz -C /tmp/site, then
# PYTHONPATH=/tmp/site (scripts/gpu_tilelang.sh does this).
# Wheels come from .wheels-a/ and .wheels-b/ if present, else from PyPI (needs the internet).
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
wheels="$work/wheels"
mkdir -p "$wheels"
if ls .wheels-a/*.whl >/dev/null 2>&1; then
  cp .wheels-a/*.whl .wheels-b/*.whl "$wheels"/ 2>/dev/null || cp .wheels-a/*.whl "$wheels"/
else
  python3 -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    -d "$wheels" "tilelang==0.1.15" "apache-tvm-ffi<0.1.13" z3-solver cython cloudpickle ml_dtypes \
    psutil tqdm torch-c-dlpack-ext
fi
site="$work/site"
mkdir -p "$site"
for w in "$wheels"/*.whl; do
  case "$(basename "$w")" in torch-*|nvidia_*|triton-*) continue ;; esac
  python3 -m zipfile -e "$w" "$site"
done
# z3 ships its library twice (libz3.so and libz3.so.4.x) plus a CLI binary nobody here runs
for f in "$site"/z3/lib/libz3.so.*; do
  [ -f "$f" ] && cmp -s "$f" "$site/z3/lib/libz3.so" && ln -sf libz3.so "$f"
done
rm -rf "$site"/z3_solver-*.data
tar -cJf .tilelang-site.tar.xz.tmp -C "$site" . && mv .tilelang-site.tar.xz.tmp .tilelang-site.tar.xz
ls -la .tilelang-site.tar.xz
