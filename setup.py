"""Build the CPU kernels once per variant from the same source (refmoe/kernels/kernels.h).

Each variant is its own extension module with its own instruction-set flags; refmoe.kernels
picks one at import from the CPU's flags. No -march=native: a wheel built here runs anywhere.
"""

import os

import numpy
import simde_py
from Cython.Build import cythonize
from setuptools import Extension, setup

# -ffp-contract=off: scalar C rounds as numpy does (INT4 activation quantization is bit-exact)
BASE = ["-O3", "-fopenmp", "-std=gnu11", "-fno-math-errno", "-ffp-contract=off",
        "-Wno-unused-function", "-Wno-psabi"]

AVX2 = ["-mavx2", "-mfma", "-mf16c"]
AVX512 = AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
HOST = AVX2 if os.uname().machine == "x86_64" else []  # SIMDe may use what the host has

VARIANTS = {
    # name: (extra compile flags, macros)
    "generic": ([], []),
    "avx2": (AVX2, [("REFMOE_ISA_AVX2", "1")]),
    "avx512": (AVX512, [("REFMOE_ISA_AVX512", "1")]),
    # FP8 GEMV through BF16 dot products and VBMI byte permutes, 4-bit GEMV through VNNI
    # (Zen 4+, Cooper Lake, Sapphire Rapids+: every CPU with AVX-512 BF16 has VNNI).
    # With AMX tiles for many tokens where the CPU has them (chosen at run time: the compiler
    # emits tile instructions only where the code asks for them).
    "avx512_bf16": (
        AVX512 + ["-mavx512bf16", "-mavx512vbmi", "-mavx512vnni", "-mamx-tile", "-mamx-bf16"],
        [
            ("REFMOE_ISA_AVX512", "1"),
            ("REFMOE_BF16DOT", "1"),
            ("REFMOE_VNNI", "1"),
            ("REFMOE_AMX", "1"),
        ],
    ),
    # The AVX-512 sources through SIMDe: plain C, so they build and are tested anywhere.
    "avx512_emulated": (HOST, [("REFMOE_ISA_AVX512", "1"), ("REFMOE_EMULATED", "1")]),
    "avx512_bf16_emulated": (
        HOST,
        [
            ("REFMOE_ISA_AVX512", "1"),
            ("REFMOE_BF16DOT", "1"),
            ("REFMOE_VNNI", "1"),
            ("REFMOE_EMULATED", "1"),
        ],
    ),
}


def extension(name: str, flags: list[str], macros: list[tuple[str, str]]) -> Extension:
    return Extension(
        f"refmoe.kernels._{name}",
        [f"refmoe/kernels/_{name}.pyx"],
        include_dirs=["refmoe/kernels", numpy.get_include(), simde_py.get_include()],
        define_macros=macros + [("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=BASE + flags,
        extra_link_args=["-fopenmp"],
        depends=[
            "refmoe/kernels/kernels.h",
            "refmoe/kernels/lut4.h",
            "refmoe/kernels/_kernels.pxi",
        ],
    )


is_x86 = os.uname().machine in ("x86_64", "AMD64", "i686")
names = VARIANTS if is_x86 else {"generic": VARIANTS["generic"]}
setup(
    ext_modules=cythonize(
        [extension(n, *VARIANTS[n]) for n in names],
        compiler_directives={
            "language_level": 3,
            "boundscheck": os.environ.get("REFMOE_BOUNDSCHECK") == "1",
            "wraparound": False,
            "cdivision": True,
        },
    )
)
