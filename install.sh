#!/usr/bin/env bash
# Installs racer-local and its dependencies into ./.venv (or $RACER_VENV).
#
# llama-cpp-python ships only as source, so pip compiles llama.cpp. A default
# build uses -march=native, which on CPUs with AMX turns on kernels that crash on
# the first decode; so on x86-64 we build for the instruction sets the CPU
# reports, AMX left out. Add flags with CMAKE_ARGS (the CPU flags stay unless it names
# GGML_NATIVE), e.g.
#   CMAKE_ARGS="-DGGML_CUDA=on" ./install.sh         (NVIDIA GPU)
# Metal is on by default on macOS. ggml's RPC backend (racer-local rpc-worker, --rpc) is always
# added: it costs nothing until used. The built wheel is cached per flag set in
# ~/.cache/racer-local/wheels, so a second install takes seconds. The flags and the sdist are
# recorded so that `racer-local bench` compiles llama.cpp's own llama-server (its peer) from the
# same source with the same flags.
#
# Usage: ./install.sh [--dev] [--llama-server]
#   --dev           adds what the tests use: the test tools, llama-server, and (as root, with
#                   apt-get) Debian's chromium for the web chat's browser test
#   --llama-server  also compiles llama-server now (about 10 minutes on 2 cores, cached), instead
#                   of on the first bench that asks for a llama.cpp method
set -euo pipefail
cd "$(dirname "$0")"

LLAMA_CPP_PYTHON_VERSION=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
VENV=${RACER_VENV:-.venv}
EXTRAS=""
SERVER=""
for arg in "$@"; do
    case "$arg" in
        --dev) EXTRAS="[dev]"; SERVER=1 ;;
        --llama-server) SERVER=1 ;;
        *) echo "install.sh: unknown option $arg (use --dev, --llama-server)" >&2; exit 2 ;;
    esac
done

cpu_cmake_args() {
    local args="-DLLAVA_BUILD=OFF"
    if [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
        local flags
        flags=" $(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2) "
        args="$args -DGGML_NATIVE=OFF"
        local pair
        for pair in avx:AVX avx2:AVX2 fma:FMA f16c:F16C avx512f:AVX512 \
                    avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI \
                    avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
            if [[ "$flags" == *" ${pair%%:*} "* ]]; then
                args="$args -DGGML_${pair#*:}=ON"
            fi
        done
    fi
    echo "$args"
}

# CPU flags go in unless CMAKE_ARGS says otherwise: a GPU build still runs some ops on the CPU,
# and on an AMX host llama.cpp's native default would crash there.
if [ -z "${CMAKE_ARGS:-}" ]; then
    CMAKE_ARGS=$(cpu_cmake_args)
elif [[ "$CMAKE_ARGS" != *GGML_NATIVE* ]]; then
    CMAKE_ARGS="$CMAKE_ARGS $(cpu_cmake_args)"
fi
[[ "$CMAKE_ARGS" == *GGML_RPC* ]] || CMAKE_ARGS="$CMAKE_ARGS -DGGML_RPC=ON"
export CMAKE_ARGS
echo "install.sh: building llama.cpp with CMAKE_ARGS=\"$CMAKE_ARGS\"" >&2

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

# Keep in step with racer_local/llama_server_build.py, which computes the same key without a record.
key=$(printf '%s %s %s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS" "$("$PY" -c 'import sys;print(sys.version)')" | sha256sum | cut -c1-16)
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/racer-local"
WHEELS="$CACHE/wheels/$key"
SDIST="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    [ -f "$SDIST" ] || "$PY" -m pip download --quiet --no-deps --no-binary :all: -d "$CACHE/sdist" \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    echo "install.sh: compiling llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (a few minutes, once)" >&2
    "$PY" -m pip wheel --quiet --no-deps --no-cache-dir -w "$WHEELS.tmp" "$SDIST"
    mv "$WHEELS.tmp" "$WHEELS"
fi
"$PY" -m pip install --quiet "$WHEELS"/llama_cpp_python-*.whl
# pip keeps an installed llama-cpp-python of the same version even if it was built with other
# flags: replace it when the venv's record names another build.
RECORD="$VENV/share/racer-local/build.json"
if [ ! -f "$RECORD" ] || ! grep -q "\"key\": \"$key\"" "$RECORD"; then
    "$PY" -m pip install --quiet --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-*.whl
fi
"$PY" -m pip install --quiet -e ".$EXTRAS"
mkdir -p "$(dirname "$RECORD")"
"$PY" -c 'import json, sys; v, a, k, c = sys.argv[1:]; print(json.dumps(
    {"llama_cpp_python": v, "cmake_args": a, "key": k, "cache": c}))' \
    "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS" "$key" "$CACHE" > "$RECORD"
[ -z "$SERVER" ] || "$VENV/bin/racer-local" build-llama-server >/dev/null
if [ -n "$EXTRAS" ] && ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "install.sh: installing Debian's chromium for the browser test" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
echo "install.sh: done; run $VENV/bin/racer-local --help" >&2
