#!/usr/bin/env bash
# Installs racer-local and its dependencies into ./.venv (or $RACER_VENV).
#
# llama-cpp-python ships only as source, so pip compiles llama.cpp. A default
# build uses -march=native, which on CPUs with AMX turns on kernels that crash on
# the first decode; so on x86-64 we build for the instruction sets the CPU
# reports, AMX left out. Set CMAKE_ARGS yourself to override, e.g.
#   CMAKE_ARGS="-DGGML_CUDA=on" ./install.sh         (NVIDIA GPU)
# Metal is on by default on macOS. The built wheel is cached per flag set in
# ~/.cache/racer-local/wheels, so a second install takes seconds.
#
# Usage: ./install.sh [--dev]     (--dev adds the test tools)
set -euo pipefail
cd "$(dirname "$0")"

LLAMA_CPP_PYTHON_VERSION=0.3.36
VENV=${RACER_VENV:-.venv}
EXTRAS=""
[ "${1:-}" = "--dev" ] && EXTRAS="[dev]"

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

export CMAKE_ARGS="${CMAKE_ARGS:-$(cpu_cmake_args)}"
echo "install.sh: building llama.cpp with CMAKE_ARGS=\"$CMAKE_ARGS\"" >&2

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip

key=$(printf '%s %s %s' "$LLAMA_CPP_PYTHON_VERSION" "$CMAKE_ARGS" "$("$PY" -c 'import sys;print(sys.version)')" | sha256sum | cut -c1-16)
WHEELS="${XDG_CACHE_HOME:-$HOME/.cache}/racer-local/wheels/$key"
if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "install.sh: compiling llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (a few minutes, once)" >&2
    "$PY" -m pip wheel --quiet --no-deps --no-cache-dir --no-binary llama-cpp-python \
        -w "$WHEELS.tmp" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    mv "$WHEELS.tmp" "$WHEELS"
fi
"$PY" -m pip install --quiet "$WHEELS"/llama_cpp_python-*.whl
"$PY" -m pip install --quiet -e ".$EXTRAS"
echo "install.sh: done; run $VENV/bin/racer-local --help" >&2
