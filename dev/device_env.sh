# Sourced by the dev/gpu_*.sh device commands: the set-up an offline GPU machine needs, once.
#   MAKE_ENV_LOG=FILE source dev/device_env.sh       (default: make env's output is dropped)
# - .tilelang-site.tar.xz (tools/pack_tilelang_site.sh), when carried, is unpacked into /tmp/site
#   and put on PYTHONPATH; without it an installed tilelang is used, or none (its cases skip);
# - the repository root goes on PYTHONPATH, pip is kept offline (PIP_NO_INDEX=1), and `make env`
#   builds .venv on the machine's torch;
# - every wheel carried under .whl/ (the peers' libraries, which pip cannot fetch offline:
#   liger-kernel, transformer-engine==2.20.2; docs/offline-gpu.md) is installed into the venv
#   without dependencies;
# - PY is the venv's python, or python3 when make env failed.
if [ -f .tilelang-site.tar.xz ]; then
  if [ ! -d /tmp/site/tilelang ]; then
    mkdir -p /tmp/site && tar -xJf .tilelang-site.tar.xz -C /tmp/site \
      || echo "WARN: unpacking .tilelang-site.tar.xz failed; tilelang cases will be skipped"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# - Triton's compile cache is .triton-cache/ in the checkout (TRITON_CACHE_DIR, unless set): one
#   packed by an earlier call (tar -cf - .triton-cache | xz -T8 -2 > $OUT/triton-cache.tar.xz) and
#   carried back as .triton-cache.tar.xz is merged into it, so those kernels are not compiled again
#   (Liger's mHC compiles for minutes per width and token count);
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
if [ -f .triton-cache.tar.xz ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar -xJf .triton-cache.tar.xz -C "$TRITON_CACHE_DIR" --strip-components=1 \
    || echo "WARN: unpacking .triton-cache.tar.xz failed; its kernels compile again"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PIP_NO_INDEX=1
MAKE_ENV_LOG=${MAKE_ENV_LOG:-/dev/null}
if ! timeout -k 10 240 make env >>"$MAKE_ENV_LOG" 2>&1; then
  echo "make env failed; falling back to python3"
  [ -f "$MAKE_ENV_LOG" ] && tail -20 "$MAKE_ENV_LOG"
fi
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
for w in .whl/*.whl; do
  [ -f "$w" ] && "$PY" -m pip install -q --no-index --no-deps "$w"
done
