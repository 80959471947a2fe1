"""Which scale layouts torch._scaled_mm accepts for DeepSeek's block-scaled FP8 on this device.

    python benchmarks/scaled_mm_probe.py

For K-block counts that are and are not multiples of 4, every combination of: activation
scales [M, K/128] row- or column-major; weight scales [K/128, N/128] as a transposed view of
the stored [N/128, K/128] or contiguous; the weight scales' K blocks padded to a multiple of 4
or not. Prints the relative error against the dequantized float32 product, or torch's refusal.
refmoe.slp.Matmul uses the first layout that agrees (column-major activation scales, a
transposed view of the padded weight scales).
"""

import itertools

import torch
import torch.nn.functional as F

from refmoe.slp import _block_dequant


def scaled(x, w, scale, a_col, b_contig, pad):
    m, k = x.shape
    mp, kb = -(-m // 4) * 4, -(-k // 128)
    xp = F.pad(x.float(), (0, kb * 128 - k, 0, mp - m)).view(mp, kb, 128)
    sa = xp.abs().amax(-1).clamp(min=1e-12) / 448.0  # [Mp, K/128]
    q = (xp / sa[..., None]).view(mp, kb * 128)[:, :k].to(torch.float8_e4m3fn)
    if a_col:
        sa = sa.t().contiguous().t()
    sb = (F.pad(scale.float(), (0, -kb % 4)) if pad else scale.float()).t()
    if b_contig:
        sb = sb.contiguous()
    return torch._scaled_mm(q, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)[:m]


def main() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    print("torch", torch.__version__, torch.cuda.get_device_name())
    for n, k, m in ((256, 256, 16), (384, 640, 16), (2048, 7168, 128), (7168, 2048, 1024)):
        x = torch.randn(m, k, generator=g).to(dev)
        w = (torch.randn(n, k, generator=g) * 0.1).to(torch.float8_e4m3fn).to(dev)
        s = (torch.rand(n // 128, k // 128, generator=g) + 0.5).to(dev)
        want = x @ _block_dequant(w, s, torch.float32).T
        for a_col, b_contig, pad in itertools.product((True, False), repeat=3):
            try:
                got = scaled(x, w, s, a_col, b_contig, pad).float()
                res = f"rel err {float((got - want).norm() / want.norm()):.4f}"
            except (RuntimeError, TypeError, ValueError) as e:
                res = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            print(
                f"N={n} K={k} M={m} a_col_major={a_col:d} b_contiguous={b_contig:d} "
                f"pad_kb={pad:d}: {res}"
            )


if __name__ == "__main__":
    main()
