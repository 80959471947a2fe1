# Variant module "avx2": kernels.h compiled with this variant's flags (see setup.py).
include "_kernels.pxi"
