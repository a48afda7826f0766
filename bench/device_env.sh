#!/usr/bin/env bash
# The packages the GPU image lacks (jax-triton for the triton backend, tensorboardX for training),
# as wheels carried to the device:
#   here, once:            bash bench/device_env.sh --download    (writes .whl/, git-ignored)
#   on the device, first:  source bench/device_env.sh             (run with carry: [".whl"])
# Installs the wheels into /tmp/site and puts it and the working tree on PYTHONPATH.
if [ "${1:-}" = "--download" ]; then
  set -euo pipefail
  cd "$(dirname "$0")/.."
  grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 -d .whl jax-triton==0.3.1 tensorboardX protobuf
  exit 0
fi
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/jax_triton*.whl \
  .whl/tensorboardx*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
# tensorboardX needs protobuf; the carried wheel is used only where the image has none.
if ! python3 -c "import tensorboardX" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site-protobuf .whl/protobuf*.whl
  export PYTHONPATH=/tmp/site-protobuf:$PYTHONPATH
fi
# english_cache: the token cache of .corpus/english.txt.gz (bench/build_english_corpus.py, carried
# in .corpus) at /tmp/c/english with a 32k vocabulary, prepared on first use; prints its path.
english_cache() {
  local cache=/tmp/c/english
  [ -f "$cache/meta.json" ] || python3 -m relu_sparsity.cli prepare .corpus/english.txt.gz \
    --out "$cache" --vocab-size 32768 --tokenizer-sample-mb 20 --no-progress >&2
  echo "$cache"
}
