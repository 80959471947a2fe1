"""Every variant against float64 numpy, against the naive kernel, and against each other.

Error bound for y = x W^T with fp32 accumulation of K products (plus a fixed number of
roundings for the scale fold, the tile dequantization and the final sums):
    |y - y64| <= 2 (K + 8) 2^-24 * sum_k |x_k| m_nk + 2^-126
where m_nk = |w_nk s| for FP8 and BF16. The INT4 GEMV computes s (sum_k q x - 8 sum_k x) with
q in 0..15, so its terms are bounded by m_nk = (|w_nk| + 16 s_g) instead. INT4 runs on
activations quantized to int8 per chunk of 32 (formats.q8_quantize, bit-exact with the C code),
so its reference is the float64 product with those dequantized activations; the products
themselves are exact integers.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import amx_slack, fp8_route_as
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refmoe import kernels
from refmoe.kernels import formats

U = 2.0**-24
WHOLE = formats.WHOLE
# FP8 scale blocks as checkpoints store them: DeepSeek's 128 x 128 (drawn most), per output
# channel, per tensor, other weight_block_sizes, and blocks that end inside a chunk of 32 codes
FP8_BLOCKS = [(128, 128)] * 4 + [
    (1, WHOLE),
    (WHOLE, WHOLE),
    (64, 64),
    (1, 128),
    (256, 384),
    (48, 80),
    (16, 40),
    (200, 7),
]
FINITE = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
SUBNORMAL = FINITE[(FINITE & 0x78) == 0]
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def check(y: np.ndarray, y64: np.ndarray, mag: np.ndarray, k: int, factor: float = 1.0, slack=0.0):
    bound = factor * (2 * (k + 8) * U * mag + 2.0**-126) + slack
    err = np.abs(y.astype(np.float64) - y64)
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), f"err {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst}"


@st.composite
def fp8_case(draw):
    m = draw(st.integers(1, 64))
    n = draw(st.integers(1, 300))
    k = draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    codes_kind = draw(st.sampled_from(["gauss", "subnormal", "extreme", "uniform"]))
    scale_kind = draw(st.sampled_from(["normal", "tiny", "huge", "mixed"]))
    block = draw(st.sampled_from(FP8_BLOCKS))
    rng = np.random.default_rng(seed)
    if codes_kind == "gauss":
        codes, _ = formats.fp8_quantize(rng.standard_normal((n, k)), block)
    else:
        pool = {
            "subnormal": SUBNORMAL,
            "extreme": np.array([0x7E, 0xFE, 0], np.uint8),
            "uniform": FINITE,
        }[codes_kind]
        codes = rng.choice(pool, size=(n, k)).astype(np.uint8)
    shape = formats.scale_shape(n, k, block)
    exp = {
        "normal": rng.uniform(-10, -3, shape),
        "tiny": rng.uniform(-62, -58, shape),
        "huge": rng.uniform(58, 62, shape),
        "mixed": rng.uniform(-40, 40, shape),
    }[scale_kind]
    s = np.exp2(exp).astype(np.float32)
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, 1))).astype(np.float32)
    return x, codes, s, block


def fp8_reference(x, codes, s, block=(128, 128), variant=None):
    """The float64 product, its magnitude, and (given the variant) the AMX tiles' slack."""
    w = formats.fp8_dequantize(codes, s, block)
    x64 = x.astype(np.float64)
    mag = np.abs(x64) @ np.abs(w).T
    if variant is None:
        return x64 @ w.T, mag
    return x64 @ w.T, mag, amx_slack(variant, x, w, mag)


@SETTINGS
@given(case=fp8_case())
def test_fp8_gemm_vs_float64(variant, fp8_route, case):
    x, codes, s, block = case
    y64, mag, slack = fp8_reference(x, codes, s, block, variant)
    y = kernels.fp8_gemm(x, codes, s, block=block, variant=variant, num_threads=2)
    check(y, y64, mag, x.shape[1], slack=slack)


@SETTINGS
@given(case=fp8_case())
def test_fp8_naive_beside_fast(variant, fp8_route, case):
    x, codes, s, block = case
    y64, mag, slack = fp8_reference(x, codes, s, block, variant)
    naive = kernels.fp8_gemm(x, codes, s, block=block, variant=variant, naive=True)
    check(naive, y64, mag, x.shape[1])
    fast = kernels.fp8_gemm(x, codes, s, block=block, variant=variant)
    check(fast, naive.astype(np.float64), mag, x.shape[1], factor=2.0, slack=slack)


@SETTINGS
@given(case=fp8_case())
def test_variants_agree(case):
    x, codes, s, block = case
    _, mag, base_slack = fp8_reference(x, codes, s, block, kernels.variant())
    base = kernels.fp8_gemm(x, codes, s, block=block).astype(np.float64)
    for route in kernels.FP8_GEMV_ROUTES:
        with fp8_route_as(route):
            for v in kernels.available_variants():
                got = kernels.fp8_gemm(x, codes, s, block=block, variant=v)
                slack = base_slack + fp8_reference(x, codes, s, block, v)[2]
                check(got, base, mag, x.shape[1], factor=2.0, slack=slack)


@pytest.mark.parametrize(
    "pair", [("avx512_bf16", "avx512"), ("avx512_bf16_emulated", "avx512_emulated")]
)
def test_fp8_fp32_route_is_the_avx512_gemv(pair):
    """On its fp32 route (the default) a BF16 build's FP8 GEMV is the avx512 build's, bit for bit,
    and on its bf16 route it is not that code (the two round differently)."""
    if not set(pair) <= set(kernels.available_variants()):
        pytest.skip(f"{pair} not both built and runnable here")
    rng = np.random.default_rng(7)
    codes, s = formats.fp8_quantize(rng.standard_normal((256, 1000)))
    x = rng.standard_normal((1, 1000)).astype(np.float32)
    with fp8_route_as("fp32"):
        plain = kernels.fp8_gemm(x, codes, s, variant=pair[1])
        assert kernels.fp8_gemv_route(pair[0]) == "fp32"
        assert np.array_equal(kernels.fp8_gemm(x, codes, s, variant=pair[0]), plain)
    with fp8_route_as("bf16"):
        assert kernels.fp8_gemv_route(pair[0]) == "bf16"
        assert kernels.fp8_gemv_route(pair[1]) == "fp32"  # one route there
        assert not np.array_equal(kernels.fp8_gemm(x, codes, s, variant=pair[0]), plain)


def test_fp8_route_setting_is_checked():
    with pytest.raises(ValueError, match="fp32 or bf16"):
        kernels.set_fp8_gemv_route("fp16")
    code = "from refmoe import kernels; print(kernels.fp8_gemv_route())"
    check_env_setting("REFMOE_FP8_GEMV", code, (("fp32", True), ("fp16", False)))


TRANSPOSED = ["avx512_bf16", "avx512", "avx512_emulated", "avx512_bf16_emulated"]


@pytest.mark.parametrize("v", TRANSPOSED)
@pytest.mark.parametrize(
    ("m", "n", "k", "block"),
    [
        (16, 33, 300, (128, 128)),  # one vector of tokens, a tile with one row of 32 past N
        (17, 100, 257, (48, 80)),  # a second vector for one token; blocks end inside 16 codes
        (40, 64, 130, (16, 40)),
        (130, 70, 200, (200, 7)),  # two passes of tokens (128 + 2)
        (300, 31, 1000, (1, WHOLE)),  # per-channel scales, three passes
    ],
)
def test_many_tokens_transposed_tiles(v, m, n, k, block):
    """From 16 tokens the AVX-512 builds multiply transposed activations by broadcast weights
    (rows_tiled_t): FP8 and MXFP4 within the float64 bound, as the dot-product tiles are, at
    any token count (several 128-token passes), N off the 32-row tiles, K off the 128-wide
    ones, and FP8 column blocks that end inside the 16 codes the tile conversion takes."""
    if v not in kernels.available_variants():
        pytest.skip(f"{v} is not built or cannot run here")
    mod = kernels._module(v)
    rng = np.random.default_rng(m * 1000 + n)
    w = rng.standard_normal((n, k))
    codes, s = formats.fp8_quantize(w, block)
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))).astype(np.float32)
    y64, mag = fp8_reference(x, codes, s, block)
    blocks, scales = formats.mxfp4_quantize(w)
    # MXFP4 runs on int8-quantized activations (either path): its reference uses them
    w4 = formats.mxfp4_dequantize(blocks, scales, k).astype(np.float64)
    xdq = formats.q8_quantize(x)[1].astype(np.float64)
    y4, mag4 = xdq @ w4.T, np.abs(xdq) @ np.abs(w4).T
    before, amx_before = mod.tiled_t(-1), kernels.set_amx_tiles(False)  # AMX's: below
    try:
        got = {}
        for on in (0, 1):
            assert mod.tiled_t(on) in (0, 1)
            got[on] = (
                kernels.fp8_gemm(x, codes, s, block=block, variant=v, num_threads=2),
                kernels.mxfp4_gemm(x, blocks, scales, variant=v, num_threads=2),
            )
            check(got[on][0], y64, mag, k)
            check(got[on][1], y4, mag4, k)
        assert not np.array_equal(got[0][0], got[1][0])  # two paths, not one taken twice
    finally:
        mod.tiled_t(before)
        kernels.set_amx_tiles(amx_before)


@pytest.mark.parametrize(
    ("m", "n", "k", "block"),
    [
        (16, 33, 300, (128, 128)),  # one block of 16 tokens, 32-row tiles one row past N
        (17, 100, 257, (48, 80)),  # a second block for one token; K off the 128-wide tiles
        (40, 64, 130, (16, 40)),
        (300, 31, 1000, (1, WHOLE)),  # two passes of tokens, per-channel scales
        (530, 70, 200, (200, 7)),  # three passes
    ],
)
def test_many_tokens_amx_tiles(m, n, k, block):
    """From 16 tokens the avx512_bf16 build multiplies on AMX tiles where the CPU has them
    (rows_tiled_amx: bf16x3): every format within the float32 bound plus AMX's stated slack,
    not the float32 tiles' numbers (another path), the same bits over 1-3 threads, and 15 tokens
    the float32 tiles' bits exactly (below the threshold)."""
    v = "avx512_bf16"
    if v not in kernels.available_variants() or kernels._module(v).tiled_amx(-1) < 0:
        pytest.skip("no AMX-BF16 tiles on this CPU (or the kernel refuses their state)")
    rng = np.random.default_rng(m * 7 + k)
    w = rng.standard_normal((n, k))
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-2, 2, (m, 1))).astype(np.float32)
    xdq = formats.q8_quantize(x)[1]  # the 4-bit and INT4 formats run on int8 activations
    codes, s = formats.fp8_quantize(w, block)
    blocks, scales = formats.mxfp4_quantize(w)
    nv, nvs, nvg = formats.nvfp4_quantize(w)
    ip, isc = formats.int4g_quantize(w)
    i4, i4s = formats.int4_quantize(w, 32)
    bits = formats.bf16_encode(w.astype(np.float32))
    cases = {  # name: (run(x, threads), activations the reference uses, weights)
        "fp8": (
            lambda a, t: kernels.fp8_gemm(a, codes, s, block=block, variant=v, num_threads=t),
            x,
            formats.fp8_dequantize(codes, s, block),
        ),
        "mxfp4": (
            lambda a, t: kernels.mxfp4_gemm(a, blocks, scales, variant=v, num_threads=t),
            xdq,
            formats.mxfp4_dequantize(blocks, scales, k),
        ),
        "nvfp4": (
            lambda a, t: kernels.nvfp4_gemm(a, nv, nvs, nvg, variant=v, num_threads=t),
            xdq,
            formats.nvfp4_dequantize(nv, nvs, nvg, k),
        ),
        "int4g": (
            lambda a, t: kernels.int4g_gemm(a, ip, isc, variant=v, num_threads=t),
            xdq,
            formats.int4g_dequantize(ip, isc, k, 32),
        ),
        "int4": (
            lambda a, t: kernels.int4_gemm(a, i4, i4s, group_size=32, variant=v, num_threads=t),
            xdq,
            formats.int4_dequantize(i4, i4s, k, 32),
        ),
        "bf16": (
            lambda a, t: kernels.bf16_gemm(a, bits, variant=v, num_threads=t),
            x,
            formats.bf16_decode(bits),
        ),
    }
    before = kernels.set_amx_tiles(True)
    try:
        for name, (run, xa, wd) in cases.items():
            x64, w64 = xa.astype(np.float64), np.asarray(wd, np.float64)
            mag = np.abs(x64) @ np.abs(w64).T
            amx = run(x, 2)
            check(amx, x64 @ w64.T, mag, k, slack=amx_slack(v, xa, w64, mag))
            for t in (1, 3):
                assert np.array_equal(run(x, t), amx), (name, t)
            kernels.set_amx_tiles(False)
            assert not np.array_equal(run(x, 2), amx), name  # two paths, not one taken twice
            below = run(x[:15], 2)
            kernels.set_amx_tiles(True)
            assert np.array_equal(run(x[:15], 2), below), name
    finally:
        kernels.set_amx_tiles(before)


def check_env_setting(var: str, code: str, cases) -> None:
    """Each (text, ok) of the environment variable in a fresh process running code: ok ones
    print their text back, the others stop with the variable named."""
    for text, ok in cases:
        env = dict(os.environ, **{var: text})
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if ok:
            assert res.returncode == 0 and res.stdout.strip() == text, res.stderr
        else:
            assert res.returncode != 0 and var in res.stderr


def test_amx_setting_is_checked():
    """REFMOE_AMX takes 0 or 1 and names itself otherwise; the builds without AMX tiles say so
    (tiled_amx: -1), and amx_tiles is False there."""
    code = "from refmoe import kernels; print(int(kernels.set_amx_tiles(True)))"
    check_env_setting("REFMOE_AMX", code, (("0", True), ("1", True), ("yes", False)))
    for v in kernels.available_variants():
        if v != "avx512_bf16":
            assert kernels._module(v).tiled_amx(-1) == -1
            assert not kernels.amx_tiles(v)


def test_prefetch_distance_changes_no_number():
    """The GEMVs' prefetch distance moves when weights arrive, never what is computed: every
    variant's FP8 (1 and 3 tokens, both routes where a build has two), BF16, INT4 and 4-bit
    GEMVs give the same bits at 0, one line, 2 KiB, 16 KiB and 1 MiB ahead (past the end of
    the weights: a prefetch never faults), and the setting reaches every loaded build."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((96, 1100))
    x1 = rng.standard_normal((1, 1100)).astype(np.float32)
    x3 = rng.standard_normal((3, 1100)).astype(np.float32)
    codes, s = formats.fp8_quantize(w)
    bits = formats.bf16_encode(w.astype(np.float32))
    packed, ps = formats.int4_quantize(w)
    blocks, scales = formats.mxfp4_quantize(w)

    def outputs(v: str) -> list[np.ndarray]:
        return [
            kernels.fp8_gemm(x1, codes, s, variant=v),
            kernels.fp8_gemm(x3, codes, s, variant=v),
            kernels.bf16_gemm(x1, bits, variant=v),
            kernels.int4_gemm(x1, packed, ps, variant=v),
            kernels.mxfp4_gemm(x1, blocks, scales, variant=v),
            kernels.mxfp4_gemm(x3, blocks, scales, variant=v),
        ]

    before, hint = kernels.prefetch_distance(), kernels.prefetch_hint()
    hint4 = kernels.prefetch_hint(four_bit=True)
    try:
        for route in ("fp32", "bf16"):
            with fp8_route_as(route):
                kernels.set_prefetch_distance(2048)
                kernels.set_prefetch_hint("nta")
                kernels.set_prefetch_hint("nta", four_bit=True)
                base = {v: outputs(v) for v in kernels.available_variants()}
                for nbytes in (0, 64, 16384, kernels.PREFETCH_MAX):
                    for h in kernels.PREFETCH_HINTS:
                        h4 = kernels.PREFETCH_HINTS[-1 - kernels.PREFETCH_HINTS.index(h)]
                        kernels.set_prefetch_distance(nbytes)
                        kernels.set_prefetch_hint(h)
                        kernels.set_prefetch_hint(h4, four_bit=True)
                        assert kernels.prefetch_distance() == nbytes
                        assert kernels.prefetch_hint() == h
                        assert kernels.prefetch_hint(four_bit=True) == h4
                        for v, want in base.items():
                            mod = kernels._module(v)
                            assert mod.prefetch_dist(-1) == nbytes, v
                            assert mod.prefetch_hint(-1) == kernels.PREFETCH_HINTS.index(h), v
                            assert mod.prefetch_hint4(-1) == kernels.PREFETCH_HINTS.index(h4), v
                            for got, ref in zip(outputs(v), want):
                                assert np.array_equal(got, ref), (v, route, nbytes, h, h4)
    finally:
        kernels.set_prefetch_distance(before)
        kernels.set_prefetch_hint(hint)
        kernels.set_prefetch_hint(hint4, four_bit=True)


def test_prefetch_hint_by_cpu_and_setting():
    """prefetcht0 on Intel, prefetcht1 on Zen 4 (AMD family 25 with AVX-512), prefetchnta
    elsewhere (Zen 3: family 25 without AVX-512; Zen 5: family 26), from /proc/cpuinfo's
    vendor_id, cpu family and flags; a bad setting names itself and changes nothing."""

    from refmoe import cpu

    def cpuinfo(vendor: str, family: int, flags: str) -> str:
        return (
            f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
            f"model\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\n"
            f"processor\t: 1\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
        )

    zen4 = cpuinfo("AuthenticAMD", 25, "fpu avx2 avx512f avx512bw")
    assert cpu.cpu_vendor(zen4) == "AuthenticAMD"
    assert cpu.cpu_family(zen4) == 25
    assert cpu.cpu_flags(zen4) == {"fpu", "avx2", "avx512f", "avx512bw"}
    assert cpu.cpu_vendor("processor\t: 0\n") == "" and cpu.cpu_family("processor\t: 0\n") is None
    assert cpu.cpu_family("cpu family\t: x\n") is None
    cases = {
        ("GenuineIntel", 6, "avx2 avx512f amx_tile"): "t0",
        ("AuthenticAMD", 25, "avx2 avx512f avx512bw"): "t1",  # Zen 4
        ("AuthenticAMD", 25, "avx2 fma f16c"): "nta",  # Zen 3
        ("AuthenticAMD", 26, "avx2 avx512f avx512bw"): "nta",  # Zen 5
        ("AuthenticAMD", 23, "avx2"): "nta",  # Zen 2
        ("", 0, ""): "nta",
    }
    for (vendor, family, flags), want in cases.items():
        info = cpuinfo(vendor, family, flags)
        seen = cpu.cpu_vendor(info), cpu.cpu_family(info), cpu.cpu_flags(info)
        assert kernels.default_prefetch_hint(*seen) == want, (vendor, family, flags)
        # the 4-bit loop keeps prefetchnta on Zen 4 (T1 slowed gpt-oss's shape there)
        want4 = "nta" if want == "t1" else want
        assert kernels.default_prefetch_hint(*seen, four_bit=True) == want4, (vendor, family)
    assert kernels.default_prefetch_hint("AuthenticAMD") == "nta"
    before = kernels.prefetch_hint()
    before4 = kernels.prefetch_hint(four_bit=True)
    for four_bit in (False, True):
        with pytest.raises(ValueError, match="prefetch hint"):
            kernels.set_prefetch_hint("t2", four_bit=four_bit)
    assert kernels.prefetch_hint() == before
    assert kernels.prefetch_hint(four_bit=True) == before4
    code = "from refmoe import kernels; print(kernels.prefetch_hint())"
    check_env_setting(
        "REFMOE_PREFETCH_HINT", code, (("t0", True), ("nta", True), ("t1", True), ("T0", False))
    )
    code = "from refmoe import kernels; print(kernels.prefetch_hint(four_bit=True))"
    check_env_setting(
        "REFMOE_PREFETCH_HINT_4BIT", code, (("t0", True), ("nta", True), ("t1", True), ("x", False))
    )
    # t1's lines go to L2: its default distance is the long one whatever the L1
    env = {k: v for k, v in os.environ.items() if k != "REFMOE_PREFETCH_BYTES"}
    env["REFMOE_PREFETCH_HINT"] = "t1"
    code = "from refmoe import kernels; print(kernels.prefetch_distance())"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0 and int(res.stdout) == kernels.PREFETCH_LONG, res.stderr


def test_prefetch_distance_by_l1_and_setting(tmp_path):
    """16 KiB ahead where L1d holds 48 KiB or more, else 2 KiB; L1d read from sysfs (the
    instruction cache and L2 skipped); a bad setting names itself and changes nothing."""

    def cache(index: str, level: int, kind: str, size: str) -> None:
        d = tmp_path / index
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")

    cache("index0", 1, "Instruction", "64K")
    cache("index1", 1, "Data", "48K")
    cache("index2", 2, "Unified", "1024K")
    assert kernels.l1d_bytes(str(tmp_path)) == 48 * 1024
    assert kernels.l1d_bytes(str(tmp_path / "none")) is None
    assert kernels.default_prefetch_distance(48 * 1024) == 16384
    assert kernels.default_prefetch_distance(32 * 1024) == 2048
    assert kernels.default_prefetch_distance(None) == 2048
    assert kernels.default_prefetch_distance(32 * 1024, "t1") == 16384  # lines go to L2
    assert kernels.default_prefetch_distance(32 * 1024, "t0") == 2048

    before = kernels.prefetch_distance()
    for bad in (-1, kernels.PREFETCH_MAX + 1):
        with pytest.raises(ValueError, match="prefetch distance"):
            kernels.set_prefetch_distance(bad)
    assert kernels.prefetch_distance() == before
    code = "from refmoe import kernels; print(kernels.prefetch_distance())"
    cases = (("4096", True), ("16k", False), ("-5", False))
    check_env_setting("REFMOE_PREFETCH_BYTES", code, cases)


@SETTINGS
@given(
    heads=st.integers(1, 6),
    blocks=st.integers(1, 3),
    pick=st.integers(0, 2),
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    block=st.sampled_from([(128, 128), (1, WHOLE), (64, 64), (32, 48)]),
)
def test_fp8_gemm_heads(variant, heads, blocks, pick, m, k, seed, block):
    """Every head's matrix (one 128-row block out of `blocks`, a strided view into one weight,
    as MLA's value halves are) against float64, bit for bit the plain GEMM on that head alone,
    and the naive kernel beside it; scale blocks of 128 rows or fewer."""
    rng = np.random.default_rng(seed)
    pick %= blocks
    codes, s = formats.fp8_quantize(rng.standard_normal((heads * blocks * 128, k)), block)
    w = codes.reshape(heads, blocks, 128, k)[:, pick]
    sc = s.reshape(heads, blocks, -1, s.shape[1])[:, pick]
    x = rng.standard_normal((heads, m, k)).astype(np.float32)
    y = kernels.fp8_gemm_heads(x, w, sc, block=block, variant=variant, num_threads=2)
    naive = kernels.fp8_gemm_heads(x, w, sc, block=block, variant=variant, naive=True)
    for b in range(heads):
        wb, sb = np.ascontiguousarray(w[b]), np.ascontiguousarray(sc[b])
        y64, mag = fp8_reference(x[b], wb, sb, block)
        check(y[b], y64, mag, k)
        check(naive[b], y64, mag, k)
        alone = kernels.fp8_gemm(x[b], wb, sb, block=block, variant=variant, num_threads=2)
        assert np.array_equal(y[b], alone)


@SETTINGS
@given(
    rows=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    m=st.integers(1, 9),
    k=st.integers(1, 300),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    blocks=st.lists(st.sampled_from([(128, 128), (1, WHOLE), (64, 64), (32, 48)]), min_size=6),
)
def test_fp8_gemm_many(variant, rows, m, k, threads, seed, blocks):
    """Weights of different heights and scale blocks on one x in one region: each output bit
    for bit its lone GEMM's, whatever the threads' split of the (weight, band) units (one
    thread's share may end inside a weight, or hold none of one); float64 beside it."""
    rng = np.random.default_rng(seed)
    weights = []
    for n, block in zip(rows, blocks):
        codes, s = formats.fp8_quantize(rng.standard_normal((n, k)), block)
        weights.append((codes, s, block))
    x = rng.standard_normal((m, k)).astype(np.float32)
    ys = kernels.fp8_gemm_many(x, weights, variant=variant, num_threads=threads)
    naive = kernels.fp8_gemm_many(x, weights, variant=variant, naive=True)
    assert len(ys) == len(weights)
    for (codes, s, block), y, yn in zip(weights, ys, naive):
        alone = kernels.fp8_gemm(x, codes, s, block=block, variant=variant, num_threads=threads)
        assert y.shape == (m, codes.shape[0]) and np.array_equal(y, alone)
        y64, mag = fp8_reference(x, codes, s, block)
        check(y, y64, mag, k)
        check(yn, y64, mag, k)


def test_fp8_gemm_many_rejects_bad_weights():
    codes, s = formats.fp8_quantize(np.ones((130, 64)))
    x = np.ones((1, 64), np.float32)
    good = (codes, s, (128, 128))
    with pytest.raises(ValueError, match="weights: expected at least one"):
        kernels.fp8_gemm_many(x, [])
    with pytest.raises(ValueError, match=r"weights\[1\]: expected \(w, scale_inv, block\)"):
        kernels.fp8_gemm_many(x, [good, (codes, s)])
    with pytest.raises(ValueError, match=r"weights\[1\].w: expected 64 columns"):
        kernels.fp8_gemm_many(x, [good, (codes[:, :32].copy(), s, (128, 128))])
    with pytest.raises(ValueError, match=r"weights\[0\].scale_inv: expected shape"):
        kernels.fp8_gemm_many(x, [(codes, s[:1], (128, 128))])
    with pytest.raises(ValueError, match=r"weights\[0\].w: expected uint8"):
        kernels.fp8_gemm_many(x, [(codes.astype(np.int8), s, (128, 128))])


def test_fp8_gemm_heads_rejects_bad_layouts():
    codes, s = formats.fp8_quantize(np.ones((2 * 128, 64)))
    w, sc = codes.reshape(2, 128, 64), s.reshape(2, 1, 1)
    x = np.ones((2, 1, 64), np.float32)
    with pytest.raises(ValueError, match="rows must be contiguous"):
        kernels.fp8_gemm_heads(x, codes.reshape(2, 128, 64)[:, :, ::2], sc)
    with pytest.raises(ValueError, match=r"scale_inv: expected float32 \(2, 1, 1\)"):
        kernels.fp8_gemm_heads(x, w, s.reshape(1, 2, 1))
    with pytest.raises(ValueError, match=r"x: expected float32 \[2, M >= 1, 64\]"):
        kernels.fp8_gemm_heads(np.ones((3, 1, 64), np.float32), w, sc)
    with pytest.raises(ValueError, match=r"w: expected uint8 \[B, N, K\]"):
        kernels.fp8_gemm_heads(x, codes, sc)


@SETTINGS
@given(
    m=st.integers(1, 64),
    n=st.integers(1, 260),
    k=st.integers(1, 300),
    group=st.sampled_from([32, 128]),
    seed=st.integers(0, 2**32 - 1),
)
def test_int4_gemm_vs_float64(variant, m, n, k, group, seed):
    rng = np.random.default_rng(seed)
    packed, scales = formats.int4_quantize(rng.standard_normal((n, k)), group)
    x = (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-3, 3, (m, 1))).astype(np.float32)
    xdq = formats.q8_quantize(x)[1].astype(np.float64)
    w = formats.int4_dequantize(packed, scales, k, group)
    s_full = np.repeat(scales.astype(np.float64), group, 1)[:, :k]
    mag = np.abs(xdq) @ (np.abs(w) + 16 * s_full).T
    y = kernels.int4_gemm(x, packed, scales, group_size=group, variant=variant)
    check(y, xdq @ w.T, mag, k, slack=amx_slack(variant, xdq, w, mag))
    naive = kernels.int4_gemm(x, packed, scales, group_size=group, variant=variant, naive=True)
    check(naive, xdq @ w.T, mag, k)


def test_q8_activation_error_is_half_a_step():
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 100)) * 50).astype(np.float32)
    q, deq = formats.q8_quantize(x)
    step = np.repeat(
        np.abs(np.pad(x, ((0, 0), (0, 28)))).reshape(3, 4, 32).max(-1) / 127, 32, axis=1
    )[:, :100]
    assert (np.abs(deq - x) <= step / 2 * (1 + 1e-6)).all()
    assert np.abs(q).max() <= 127


@SETTINGS
@given(
    m=st.integers(1, 64),
    n=st.integers(1, 260),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_bf16_gemm_vs_float64(variant, m, n, k, seed):
    rng = np.random.default_rng(seed)
    bits = formats.bf16_encode(rng.standard_normal((n, k)).astype(np.float32))
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = formats.bf16_decode(bits)
    mag = np.abs(x.astype(np.float64)) @ np.abs(w).T
    got = kernels.bf16_gemm(x, bits, variant=variant)
    check(got, x.astype(np.float64) @ w.T, mag, k, slack=amx_slack(variant, x, w, mag))


@pytest.mark.parametrize("m", [1, 7, 32])
def test_thread_count_does_not_change_bits(variant, m):
    """Each row is computed whole by one thread, so the partition cannot change the result."""
    rng = np.random.default_rng(4)
    codes, s = formats.fp8_quantize(rng.standard_normal((700, 333)))
    x = rng.standard_normal((m, 333)).astype(np.float32)
    ref = kernels.fp8_gemm(x, codes, s, variant=variant, num_threads=1)
    for t in (2, 3, 8):
        np.testing.assert_array_equal(
            kernels.fp8_gemm(x, codes, s, variant=variant, num_threads=t), ref
        )


def test_float8_numpy_view_accepted():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(5)
    codes, s = formats.fp8_quantize(rng.standard_normal((10, 20)))
    x = rng.standard_normal((1, 20)).astype(np.float32)
    view = codes.view(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(kernels.fp8_gemm(x, view, s), kernels.fp8_gemm(x, codes, s))


def test_torch_float8_tensor_accepted():
    import torch

    rng = np.random.default_rng(6)
    codes, s = formats.fp8_quantize(rng.standard_normal((10, 20)))
    x = rng.standard_normal((2, 20)).astype(np.float32)
    t = torch.from_numpy(codes).view(torch.float8_e4m3fn)
    np.testing.assert_array_equal(kernels.fp8_gemm(x, t, s), kernels.fp8_gemm(x, codes, s))


class TestBadInput:
    rng = np.random.default_rng(7)
    codes, s = formats.fp8_quantize(rng.standard_normal((130, 200)))
    x = rng.standard_normal((2, 200)).astype(np.float32)

    @pytest.mark.parametrize(
        "args, match",
        [
            (lambda c, s, x: (x.astype(np.float64), c, s), "x: expected dtype float32"),
            (lambda c, s, x: (x[:, :100].copy(), c, s), "x: expected 200 columns"),
            (lambda c, s, x: (x[0], c, s), "x: expected 2 dimensions"),
            (lambda c, s, x: (np.asfortranarray(x), c, s), "x: must be C-contiguous"),
            (lambda c, s, x: (x, c.astype(np.int8), s), "w: expected uint8 or float8_e4m3fn"),
            (lambda c, s, x: (x, c[:, ::2], s[:, :1]), "w: must be C-contiguous"),
            (lambda c, s, x: (x, c, s[:1]), r"scale_inv: expected shape \(2, 2\)"),
            (lambda c, s, x: (x, c, s.astype(np.float16)), "scale_inv: expected dtype float32"),
            (lambda c, s, x: (x.tolist(), c, s), "x: expected a numpy array"),
        ],
    )
    def test_fp8_gemm_errors(self, args, match):
        with pytest.raises(ValueError, match=match):
            kernels.fp8_gemm(*args(self.codes, self.s, self.x))

    def test_int4_errors(self):
        packed, scales = formats.int4_quantize(self.rng.standard_normal((4, 200)), 32)
        with pytest.raises(ValueError, match="packed INT4 for K=200 has 112 columns"):
            kernels.int4_gemm(self.x, packed[:, :50].copy(), scales, group_size=32)
        with pytest.raises(ValueError, match=r"scales: expected shape \(4, 2\)"):
            kernels.int4_gemm(self.x, packed, scales, group_size=128)
        with pytest.raises(ValueError, match="group_size must be 32 or 128"):
            kernels.int4_gemm(self.x, packed, scales, group_size=64)

    def test_unknown_variant(self):
        with pytest.raises(ValueError, match="unknown CPU variant 'avx1024'"):
            kernels.fp8_gemm(self.x, self.codes, self.s, variant="avx1024")

    def test_bad_thread_count(self):
        with pytest.raises(ValueError, match="num_threads must be >= 1"):
            kernels.fp8_gemm(self.x, self.codes, self.s, num_threads=0)


def test_place_copies_exactly():
    rng = np.random.default_rng(8)
    w = rng.integers(0, 255, (1000, 77), dtype=np.uint8)
    placed = kernels.place(w, num_threads=3)
    assert placed is not w and placed.dtype == w.dtype
    np.testing.assert_array_equal(placed, w)


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize(
    "fmt", ["fp8", "fp8-channel", "fp8-48x80", "bf16", "mxfp4", "nvfp4", "int4g"]
)
def test_a_few_tokens_get_their_lone_numbers(variant, fmt, m):
    """Up to 4 tokens run the GEMV per token (band by band) or, FP8 on AVX2 / AVX-512, once
    over the codes for all of them: each row of the product is bit-identical to that token run
    alone, so batched decode changes no result."""
    rng = np.random.default_rng(m)
    fp8 = fmt.startswith("fp8")
    n, k = 300, 7210 if fp8 else 700  # FP8: 64-code steps, one of 32, a scalar tail
    x = rng.standard_normal((m, k)).astype(np.float32)
    if fp8:
        block = {"fp8": (128, 128), "fp8-channel": (1, WHOLE), "fp8-48x80": (48, 80)}[fmt]
        w, s = formats.fp8_quantize(rng.standard_normal((n, k)), block)
        run = lambda a: kernels.fp8_gemm(a, w, s, block=block, variant=variant)  # noqa: E731
    elif fmt == "bf16":
        w = formats.bf16_encode(rng.standard_normal((n, k)))
        run = lambda a: kernels.bf16_gemm(a, w, variant=variant)  # noqa: E731
    else:
        w, s, g = formats.encode(rng.standard_normal((n, k)).astype(np.float32), fmt, 32)
        call = {"mxfp4": kernels.mxfp4_gemm, "int4g": kernels.int4g_gemm}
        run = (  # noqa: E731
            (lambda a: kernels.nvfp4_gemm(a, w, s, g, variant=variant))
            if fmt == "nvfp4"
            else (lambda a: call[fmt](a, w, s, variant=variant))
        )
    together = run(x)
    for i in range(m):
        assert np.array_equal(together[i], run(x[i : i + 1])[0])


@SETTINGS
@given(
    n=st.integers(1, 300),
    k=st.integers(1, 300),
    block=st.sampled_from([(128, 128), (1, 1), (16, 32), (200, 64), (128, 96)]),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_fp8_dequant_vs_float64(variant, n, k, block, threads, seed):
    """SLP's CPU dequantization: every finite code times its block's scale, exactly the
    float32 rounding of the float64 product (a code has 4 significant bits, a scale 24: the
    product is exact in float64), and with bf16 that float32 rounded to nearest even."""
    import ml_dtypes

    rng = np.random.default_rng(seed)
    bn, bk = block
    codes = rng.choice(FINITE, size=(n, k)).astype(np.uint8)
    s = np.exp2(rng.uniform(-40, 40, (-(-n // bn), -(-k // bk)))).astype(np.float32)
    per = np.repeat(np.repeat(s.astype(np.float64), bn, 0)[:n], bk, 1)[:, :k]
    want = (formats.fp8_decode(codes) * per).astype(np.float32)
    got = kernels.fp8_dequant(codes, s, block, variant=variant, num_threads=threads)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    bits = kernels.fp8_dequant(codes, s, block, bf16=True, variant=variant, num_threads=threads)
    assert bits.dtype == np.uint16
    assert np.array_equal(bits, want.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_fp8_dequant_refuses_bad_input_and_converts_as_the_gemv():
    codes = np.zeros((4, 130), np.uint8)
    with pytest.raises(ValueError, match="scale: expected shape"):
        kernels.fp8_dequant(codes, np.ones((1, 1), np.float32))
    codes[2, 129] = 0x7F
    with pytest.raises(ValueError, match="codes"):
        kernels.fp8_dequant(codes, np.ones((1, 2), np.float32))
    # unvalidated (codes checked at load), a NaN code gives NaN, as torch's conversion does
    out = kernels.fp8_dequant(codes, np.ones((1, 2), np.float32), validate=False)
    assert np.isnan(out[2, 129]) and np.count_nonzero(np.isnan(out)) == 1
    with pytest.raises(ValueError, match="block"):
        kernels.fp8_dequant(codes[:, :2], np.ones((1, 1), np.float32), (0, 128))
    # the vector conversions the kernels use, all of them, against the table
    for route in kernels.FP8_GEMV_ROUTES:
        with fp8_route_as(route):
            for gemv_path in (False, True):
                got = kernels.fp8_to_float32(FINITE, gemv_path=gemv_path)
                assert np.array_equal(got, formats.fp8_decode(FINITE).astype(np.float32))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    n=st.integers(1, 300),
    scale=st.floats(-20, 20),
    weighted=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_rms_norm_against_float64(rows, n, scale, weighted, seed):
    """kernels.rms_norm (every model's RMSNorm on the CPU) against float64 numpy, in every
    variant: within float32 rounding of the scale and the products; each row the same alone
    as among others (decode's one row and a prefill's many agree)."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, n)) * 2.0**scale).astype(np.float32)
    w = rng.standard_normal(n).astype(np.float32) if weighted else None
    x64 = x.astype(np.float64)
    want = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6)
    if weighted:
        want = want * w
    for variant in kernels.available_variants():
        got = kernels.rms_norm(x, w, 1e-6, variant=variant)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-30)
        alone = kernels.rms_norm(x[-1:], w, 1e-6, variant=variant)
        np.testing.assert_array_equal(alone[0], got[-1])
    with pytest.raises(ValueError, match=rf"weight must have shape \({n},\)"):
        kernels.rms_norm(x, np.ones(n + 1, np.float32), 1e-6)
