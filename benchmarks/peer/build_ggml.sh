#!/usr/bin/env bash
# Build llama.cpp's CPU backend (static ggml, tuned for this CPU as llama.cpp builds it by
# default: GGML_NATIVE) and benchmarks/peer/ggml_gemv.c against it, from the llama.cpp sources
# that the llama-cpp-python source distribution on the package index carries.
#
#   bash benchmarks/peer/build_ggml.sh [--tools] [WORKDIR]   (default build/peer; minutes)
#   -> WORKDIR/ggml_gemv, and WORKDIR/llama.cpp-commit.txt naming the sources' version;
#      with --tools also WORKDIR/llama-build/bin/llama-bench (for benchmarks/peer_decode.py)
#
# LLAMA_CPP_PYTHON_VERSION picks the sdist (default 0.3.36: llama.cpp 0c1e570, ggml 0.25.3);
# LLAMA_CPP_SDIST=path.tar.gz uses one already downloaded.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tools=0
if [[ ${1:-} == --tools ]]; then tools=1; shift; fi
work=$(mkdir -p "${1:-build/peer}" && cd "${1:-build/peer}" && pwd)
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
sdist=${LLAMA_CPP_SDIST:-$work/llama_cpp_python-$version.tar.gz}

if [[ ! -f $sdist ]]; then
    echo "fetching the llama-cpp-python $version source distribution" >&2
    # pip reads the sdist's metadata through its build backend (no build isolation below)
    python -c "import scikit_build_core" 2>/dev/null || python -m pip install -q scikit-build-core
    # --no-build-isolation: pip reads the metadata without building anything
    python -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$work" "llama-cpp-python==$version"
fi
src=$work/llama_cpp_python-$version
[[ -d $src ]] || tar -xzf "$sdist" -C "$work"
llama=$src/vendor/llama.cpp
[[ -f $llama/ggml/include/ggml.h ]] || { echo "no llama.cpp sources in $sdist" >&2; exit 1; }

build=$work/ggml-build
if [[ ! -f $build/ggml/src/libggml-cpu.a ]]; then
    # the top level (building ggml/ alone fails on ggml.pc.in); llama itself is not needed
    cmake -S "$llama" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF \
        -DLLAMA_BUILD_COMMON=OFF >"$work/cmake.log"
    cmake --build "$build" -j "$(nproc)" --target ggml ggml-cpu ggml-base >>"$work/cmake.log"
fi
gcc -O2 -o "$work/ggml_gemv" "$here/ggml_gemv.c" -I"$llama/ggml/include" \
    "$build/ggml/src/libggml.a" "$build/ggml/src/libggml-cpu.a" "$build/ggml/src/libggml-base.a" \
    -fopenmp -lstdc++ -lm -lpthread
{
    echo "llama-cpp-python $version"
    grep -m1 -io 'llama\.cpp@[0-9a-f]\{7,\}' "$src/CHANGELOG.md" || true
    grep -h 'set(GGML_VERSION_[MP]' "$llama/ggml/CMakeLists.txt" || true
} >"$work/llama.cpp-commit.txt"
if ((tools)); then
    # llama-bench needs libllama and common: a second build tree with the tools on
    tb=$work/llama-build
    if [[ ! -x $tb/bin/llama-bench ]]; then
        cmake -S "$llama" -B "$tb" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
            -DBUILD_SHARED_LIBS=OFF -DGGML_OPENMP=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
            -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
            -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=ON >>"$work/cmake.log"
        cmake --build "$tb" -j "$(nproc)" --target llama-bench >>"$work/cmake.log"
    fi
    echo "$tb/bin/llama-bench"
fi
echo "$work/ggml_gemv"
