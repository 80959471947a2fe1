# Variant module "avx512_bf16_emulated": kernels.h compiled with this variant's flags (see setup.py).
include "_kernels.pxi"
