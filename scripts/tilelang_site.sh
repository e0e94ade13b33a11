# Sourced by the gpu_*.sh scripts: puts TileLang on PYTHONPATH on an offline GPU machine.
# .tilelang-site.tar.xz (from scripts/pack_tilelang_site.sh) travels with the command and is
# unpacked into /tmp/site once per machine; without it an installed tilelang is used, or none.
if [ -f .tilelang-site.tar.xz ]; then
  if [ ! -d /tmp/site/tilelang ]; then
    mkdir -p /tmp/site && tar -xJf .tilelang-site.tar.xz -C /tmp/site \
      || echo "WARN: unpacking .tilelang-site.tar.xz failed; tilelang cases will be skipped"
  fi
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
