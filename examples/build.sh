#!/bin/sh
# Rebuild the example modules from their C sources with Debian's clang and wasi-libc:
#   apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32
set -eu
cd "$(dirname "$0")"
CLANG="${CLANG:-clang}"
OUT="${OUT:-modules}"       # where the .wasm files go (tests build elsewhere and compare)
mkdir -p "$OUT"
for src in src/*.c; do
    name="$(basename "$src" .c)"
    "$CLANG" --target=wasm32-wasi -O2 -Wl,--strip-all -o "$OUT/$name.wasm" "$src"
    echo "built $OUT/$name.wasm ($(wc -c < "$OUT/$name.wasm") bytes)"
done
