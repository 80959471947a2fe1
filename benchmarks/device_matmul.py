"""Device expert matmul: what one routed-expert projection costs on the device, per weight format.

    python benchmarks/device_matmul.py [--json OUT] [--tokens 128,1024,8192] [--reps 20]

For DeepSeek-V3's expert shapes (gate/up 2048x7168, down 7168x2048) and the tokens one expert
sees in SLP (4K prompt x top-8 / 256 experts = 128; 32K = 1,024), it times on the device:

  bf16            x @ w.T with w already bf16: the ceiling, measured in the same run
  fp8 dequant     refmoe.slp.Matmul "dequant": 128x128 block scales applied on the device,
                  then a bf16 matmul (what SLP runs where scaled_mm is refused)
  fp8 scaled_mm   refmoe.slp.Matmul "scaled_mm": FP8 tensor cores with block scales, where torch
                  and the device accept them (the reason is printed where not)
  mxfp4 dequant   E2M1 pairs + one E8M0 scale per 32 along K (OCP MX, gpt-oss / DeepSeek-V4
                  layout: low nibble first), decoded by table on the device, then bf16 matmul
  nvfp4 dequant   E2M1 + one E4M3 scale per 16 along K + one fp32 global scale (ModelOpt)
  fp4 scaled_mm   torch._scaled_mm on float4_e2m1fn_x2 where the device has FP4 tensor cores
                  (Blackwell); on Hopper the refusal is recorded

Each row: median time over reps (CUDA events, after warm-up), TFLOP/s, ratio to the bf16 row of
the same shape and tokens, and the relative error of the product against float64 on the exact
(decoded) weights. Run on a CUDA machine; on a CPU it runs the same code, slowly, small.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from refmoe import slp

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def _timer(device: torch.device, fn, reps: int) -> float:
    """Median seconds per call of fn over reps, after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _e2m1_table(device: torch.device) -> torch.Tensor:
    """[16] value of each E2M1 nibble (bit 3 = sign)."""
    return torch.tensor(E2M1 + [-v for v in E2M1], device=device)


def fp4_unpack(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K/2] (element 2i in the low nibble) -> float32 [N, K]."""
    lo = table[(packed & 0xF).long()]
    hi = table[(packed >> 4).long()]
    return torch.stack((lo, hi), -1).flatten(-2)  # [N, K]


def mxfp4_dequant(
    packed: torch.Tensor, scales: torch.Tensor, table: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """packed [N, K/2] uint8, scales [N, K/32] uint8 E8M0 (2^(s-127)) -> [N, K] dtype."""
    n = packed.shape[0]
    v = fp4_unpack(packed, table).view(n, -1, 32)  # [N, K/32, 32]
    s = torch.exp2(scales.float() - 127.0)  # [N, K/32]
    return (v * s[..., None]).view(n, -1).to(dtype)


def nvfp4_dequant(
    packed: torch.Tensor,
    scales: torch.Tensor,
    global_scale: float,
    table: torch.Tensor,
    dtype: torch.dtype,
) -> torch.Tensor:
    """packed [N, K/2] uint8, scales [N, K/16] float8_e4m3fn, global fp32 -> [N, K] dtype."""
    n = packed.shape[0]
    v = fp4_unpack(packed, table).view(n, -1, 16)  # [N, K/16, 16]
    s = scales.float() * global_scale  # [N, K/16]
    return (v * s[..., None]).view(n, -1).to(dtype)


def _rand_fp4(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def bench_shape(device: torch.device, n: int, k: int, m: int, reps: int) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(n * 31 + k + m)
    x = torch.randn(m, k, generator=g).to(device)  # [M, K] float32
    xb = x.to(torch.bfloat16)
    table = _e2m1_table(device)
    flops = 2.0 * m * n * k
    rows = []

    def row(fmt: str, seconds: float | None, err: float | None, note: str = "") -> None:
        rows.append(
            {
                "op": "device_matmul",
                "format": fmt,
                "m": m,
                "n": n,
                "k": k,
                "device": str(device),
                "time_us": None if seconds is None else seconds * 1e6,
                "tflops": None if seconds is None else flops / seconds / 1e12,
                "rel_err": err,
                "note": note,
            }
        )

    # bf16 ceiling: weights already in the compute dtype
    w64 = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.02
    wb = w64.to(torch.bfloat16).to(device)
    want = x.double() @ wb.double().T
    row("bf16", _timer(device, lambda: xb @ wb.T, reps), _rel_err(xb @ wb.T, want))

    # FP8 E4M3 with 128x128 block scales, through the engine's own Matmul
    codes = (w64 * 50).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)  # [N, K]
    scale = (torch.rand(-(-n // 128), -(-k // 128), generator=g) * 0.02 + 0.01).to(device)
    want = x.double() @ slp._block_dequant(codes, scale, torch.float64).T
    for kind in ("dequant", "scaled_mm"):
        mm = slp.Matmul(device, torch.bfloat16)
        if kind == "scaled_mm" and device.type == "cuda":
            mm.kind, mm.why_not = "scaled_mm", ""  # as REFMOE_SLP_MATMUL=scaled_mm
        if kind == "scaled_mm":
            if mm.kind == "scaled_mm":
                mm(xb, codes, scale)  # checks this shape against dequant
            if mm.used != "scaled_mm":
                row("fp8_scaled_mm", None, None, mm.why_not)
                continue
        mm.kind = kind
        row(
            f"fp8_{kind}",
            _timer(device, lambda: mm(xb, codes, scale), reps),
            _rel_err(mm(xb, codes, scale), want),
        )

    # MXFP4: E2M1 + E8M0 per 32
    packed = _rand_fp4(n, k, g).to(device)
    e8m0 = torch.randint(118, 124, (n, k // 32), generator=g, dtype=torch.uint8).to(device)
    want = x.double() @ mxfp4_dequant(packed, e8m0, table, torch.float64).T
    f = lambda: xb @ mxfp4_dequant(packed, e8m0, table, torch.bfloat16).T  # noqa: E731
    row("mxfp4_dequant", _timer(device, f, reps), _rel_err(f(), want))

    # NVFP4: E2M1 + E4M3 per 16 + fp32 global
    sc = (torch.rand(n, k // 16, generator=g) * 4 + 0.5).to(torch.float8_e4m3fn).to(device)
    gs = 0.004
    want = x.double() @ nvfp4_dequant(packed, sc, gs, table, torch.float64).T
    f = lambda: xb @ nvfp4_dequant(packed, sc, gs, table, torch.bfloat16).T  # noqa: E731
    row("nvfp4_dequant", _timer(device, f, reps), _rel_err(f(), want))

    # FP4 tensor cores where torch and the device offer them
    note = ""
    if device.type != "cuda" or not hasattr(torch, "float4_e2m1fn_x2"):
        note = "no CUDA device or no float4_e2m1fn_x2 in this torch"
    else:
        try:
            xa = _rand_fp4(m, k, g).to(device).view(torch.float4_e2m1fn_x2)
            wa = packed.view(torch.float4_e2m1fn_x2)
            one_a = torch.full((m, k // 32), 127, dtype=torch.uint8, device=device)
            one_b = e8m0
            f = lambda: torch._scaled_mm(  # noqa: E731
                xa,
                wa.t(),
                scale_a=one_a.view(torch.float8_e8m0fnu),
                scale_b=one_b.view(torch.float8_e8m0fnu),
                out_dtype=torch.bfloat16,
            )
            f()
            row("mxfp4_scaled_mm", _timer(device, f, reps), None, "random activations: time only")
        except (RuntimeError, TypeError, ValueError, AttributeError) as e:
            note = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    if note:
        row("mxfp4_scaled_mm", None, None, note)
    bf16 = rows[0]["tflops"]
    for r in rows:
        r["ratio_to_bf16"] = None if r["tflops"] is None else r["tflops"] / bf16
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,1024,8192")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="256x512 shapes (a smoke run)")
    ap.add_argument("--json", metavar="OUT", help="write the rows as a JSON list")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    shapes = [(256, 512), (512, 256)] if a.small else [(2048, 7168), (7168, 2048)]
    rows = []
    for n, k in shapes:
        for m in (int(t) for t in a.tokens.split(",")):
            rows += bench_shape(device, n, k, m, a.reps)
    print(
        f"{'format':<16}{'m':>6}{'n':>6}{'k':>6}{'time_us':>10}{'TFLOP/s':>9}"
        f"{'x bf16':>8}{'rel_err':>10}  note"
    )
    for r in rows:
        t = "-" if r["time_us"] is None else f"{r['time_us']:.1f}"
        tf = "-" if r["tflops"] is None else f"{r['tflops']:.1f}"
        ra = "-" if r["ratio_to_bf16"] is None else f"{r['ratio_to_bf16']:.2f}"
        er = "-" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        print(
            f"{r['format']:<16}{r['m']:>6}{r['n']:>6}{r['k']:>6}{t:>10}{tf:>9}{ra:>8}{er:>10}"
            f"  {r['note']}"
        )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
