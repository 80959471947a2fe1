"""E4M3 codes: every one converts exactly through every variant's conversions, with DAZ off
and on; NaN codes are rejected; the numpy encoder matches torch's cast."""

import numpy as np
import pytest
import torch

from refmoe import kernels
from refmoe.kernels import formats

ALL = np.arange(256, dtype=np.uint8)
FINITE = ALL[(ALL & 0x7F) != 0x7F]


def test_table_matches_torch():
    ref = torch.from_numpy(FINITE.copy()).view(torch.float8_e4m3fn).to(torch.float64).numpy()
    np.testing.assert_array_equal(formats.fp8_decode(FINITE), ref)
    assert np.isnan(formats.E4M3[[0x7F, 0xFF]]).all()


@pytest.mark.parametrize("daz", [False, True])
@pytest.mark.parametrize("gemv_path", [False, True])
def test_every_code_exact(variant, daz, gemv_path):
    kernels.set_denormals_zero(daz, num_threads=2, variant=variant)
    try:
        codes = np.tile(FINITE, 3)  # several vector widths, and a scalar tail
        out = np.empty(codes.size, np.float32)
        kernels._module(variant).fp8_to_float32(codes, out, gemv_path)
        np.testing.assert_array_equal(out.astype(np.float64), formats.fp8_decode(codes))
    finally:
        kernels.set_denormals_zero(False, num_threads=2, variant=variant)


@pytest.mark.parametrize("code", [0x7F, 0xFF])
def test_nan_codes_rejected(variant, code):
    codes = FINITE.copy()
    codes[37] = code
    with pytest.raises(ValueError, match=r"codes: NaN FP8 code at index \(37,\)"):
        kernels.fp8_to_float32(codes, variant=variant)


def test_validate_names_the_tensor():
    w = np.zeros((4, 8), np.uint8)
    kernels.validate_fp8(w, "model.layers.3.mlp.experts.7.up_proj.weight")
    w[2, 5] = 0xFF
    with pytest.raises(
        ValueError, match=r"experts\.7\.up_proj\.weight: NaN FP8 code at index \(2, 5\)"
    ):
        kernels.validate_fp8(w, "model.layers.3.mlp.experts.7.up_proj.weight")


def test_gemm_exact_under_daz(variant):
    """Subnormal codes survive a caller that set DAZ/FTZ: the kernels clear it for themselves."""
    rng = np.random.default_rng(0)
    codes = rng.choice(FINITE[(FINITE & 0x78) == 0], size=(130, 200)).astype(np.uint8)
    s = np.ones(formats.scale_shape(130, 200), np.float32)
    x = rng.standard_normal((1, 200)).astype(np.float32)
    ref = kernels.fp8_gemm(x, codes, s, variant=variant, num_threads=2)
    assert np.abs(ref).max() > 0
    kernels.set_denormals_zero(True, num_threads=2, variant=variant)
    try:
        got = kernels.fp8_gemm(x, codes, s, variant=variant, num_threads=2)
    finally:
        kernels.set_denormals_zero(False, num_threads=2, variant=variant)
    np.testing.assert_array_equal(got, ref)


def test_encode_roundtrip_and_ties():
    np.testing.assert_array_equal(formats.fp8_encode(formats.fp8_decode(FINITE)), FINITE)
    rng = np.random.default_rng(1)
    x = np.concatenate(
        [
            rng.standard_normal(20000) * 10.0 ** rng.uniform(-4, 2.5, 20000),
            (formats.E4M3[1:0x7E] + formats.E4M3[2:0x7F]) / 2,
        ]
    )  # exact ties too
    x = np.clip(x, -448, 448)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    got = formats.fp8_encode(x)
    np.testing.assert_array_equal(got, ref)
    assert formats.fp8_encode(np.array([1e6, -1e6])).tolist() == [0x7E, 0xFE]  # saturate


def test_quantize_roundtrip_error():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((300, 200))
    codes, s = formats.fp8_quantize(w)
    assert s.shape == (3, 2) and codes.dtype == np.uint8
    assert formats.fp8_nan_index(codes) is None
    err = np.abs(formats.fp8_dequantize(codes, s) - w)
    full = np.repeat(np.repeat(s, 128, 0), 128, 1)[:300, :200]
    assert (err <= 2.0**-4 * np.abs(w) + 2.0**-10 * full).all()  # half an ulp of 3 bits


def test_int4_and_bf16_formats():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((5, 70))
    for group in (32, 128):
        packed, s = formats.int4_quantize(w, group)
        assert packed.shape == (5, formats.int4_packed_cols(70)) and s.shape == (5, -(-70 // group))
        deq = formats.int4_dequantize(packed, s, 70, group)
        assert np.abs(deq - w).max() <= np.abs(w).max() / 7 / 2 + 1e-12
    x = rng.standard_normal(1000).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()
    np.testing.assert_array_equal(formats.bf16_decode(formats.bf16_encode(x)), ref)
