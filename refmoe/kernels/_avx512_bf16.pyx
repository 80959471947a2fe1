# Variant module "avx512_bf16": kernels.h compiled with this variant's flags (see setup.py).
include "_kernels.pxi"
