#!/usr/bin/env bash
# Packs TileLang 0.1.15 and its dependencies into .tilelang-site.tar.xz (~41 MB), small enough to
# travel with one command to an offline GPU machine (the wheels themselves are 83 MB: xz packs the
# shared libraries far tighter than a wheel's deflate, and z3's duplicate library becomes a link).
# On the GPU machine: mkdir -p /tmp/site && tar -xJf .tilelang-site.tar.xz -C /tmp/site, then
# PYTHONPATH=/tmp/site (dev/gpu_tilelang.sh does this).
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
  # --no-deps: tilelang depends on torch, which the GPU machine has and which must not be
  # downloaded (gigabytes of CUDA wheels); its other dependencies are named here. pip matches
  # platform tags exactly (z3-solver ships manylinux_2_27/2_34 wheels, others 2_28 or 2_17), so
  # every tag the GPU machine's glibc accepts is named. tilelang 0.1.15 needs z3-solver < 4.15.5.
  plats=()
  for t in manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux_2_24_x86_64 manylinux_2_27_x86_64 \
           manylinux_2_28_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64; do
    plats+=(--platform "$t")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 "${plats[@]}" \
    -d "$wheels" "tilelang==0.1.15" "apache-tvm-ffi<0.1.13,>=0.1.11" "z3-solver<4.15.5,>=4.13.0" \
    cython cloudpickle "ml_dtypes>=0.5.1" psutil "tqdm>=4.62.3" torch-c-dlpack-ext
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
