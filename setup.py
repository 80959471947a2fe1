"""Build the CPU kernels once per variant from the same source (refmoe/kernels/kernels.h).

Each variant is its own extension module with its own instruction-set flags; refmoe.kernels
picks one at import from the CPU's flags. No -march=native: a wheel built here runs anywhere.
"""

import os

import numpy
import simde_py
from Cython.Build import cythonize
from setuptools import Extension, setup

BASE = ["-O3", "-fopenmp", "-std=gnu11", "-fno-math-errno", "-ffp-contract=off", "-Wno-unused-function", "-Wno-psabi"]

VARIANTS = {
    # name: (extra compile flags, macros)
    "generic": ([], []),
    "avx2": (["-mavx2", "-mfma", "-mf16c"], [("REFMOE_ISA_AVX2", "1")]),
    "avx512": (
        ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"],
        [("REFMOE_ISA_AVX512", "1")],
    ),
    # The AVX-512 source through SIMDe: plain C, so it builds and is tested anywhere.
    "avx512_emulated": (
        ["-mavx2", "-mfma", "-mf16c"] if os.uname().machine == "x86_64" else [],
        [("REFMOE_ISA_AVX512", "1"), ("REFMOE_EMULATED", "1")],
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
        depends=["refmoe/kernels/kernels.h", "refmoe/kernels/_kernels.pxi"],
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
