#!/bin/sh
# Package app.py as a WASI 0.2 command component (wasi:cli/command) with componentize-py, against
# the WASI 0.2 WIT files that jco ships (what .ci/run installs in .ci/npm):
#   pip install componentize-py==0.25.1
#   npm install --prefix .ci/npm @bytecodealliance/jco@1.35.0
# The component holds CPython: ~18 MB, built in ~20 s (minutes on a busy machine); minikrust
# compiles it once per node (~1 min on 2 busy cores), then starts it from its cache in milliseconds.
set -eu
cd "$(dirname "$0")"
CPY="${COMPONENTIZE_PY:-componentize-py}"
WIT="${WASI_WIT:-../../.ci/npm/node_modules/@bytecodealliance/jco/lib/wit/builtin/0.2.12}"
rm -rf wit
mkdir -p wit/deps
for package in io clocks filesystem random sockets; do
    mkdir -p "wit/deps/$package"
    cp "$WIT/wasi-$package/package.wit" "wit/deps/$package/"
done
cp "$WIT/wasi-cli/package.wit" wit/cli.wit
"$CPY" -d wit -w wasi:cli/command@0.2.12 componentize app -o edge.wasm
rm -rf wit
echo "built edge.wasm ($(wc -c < edge.wasm) bytes)"
