# Variant module "avx512_emulated": kernels.h compiled with this variant's flags (see setup.py).
include "_kernels.pxi"
