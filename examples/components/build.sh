#!/bin/sh
# Rebuild the example components from the example modules with jco (npm @bytecodealliance/jco):
# each WASI preview 1 command module, wrapped with the preview 1 adapter, becomes a WASI 0.2
# component exporting wasi:cli/run. jco comes from $JCO, .ci/npm (what .ci/run installs), or PATH:
#   npm install --prefix .ci/npm @bytecodealliance/jco@1.35.0
set -eu
cd "$(dirname "$0")"
JCO="${JCO:-$(ls ../../.ci/npm/node_modules/.bin/jco 2>/dev/null || command -v jco)}"
OUT="${OUT:-.}"       # where the .wasm files go (tests build elsewhere and compare)
mkdir -p "$OUT"
for module in ../modules/*.wasm; do
    name="$(basename "$module")"
    "$JCO" new "$module" --wasi-command -o "$OUT/$name"
    echo "built $OUT/$name ($(wc -c < "$OUT/$name") bytes)"
done
