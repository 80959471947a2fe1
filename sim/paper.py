"""`refmoe-sim reproduce-paper`: the paper's headline numbers predicted from spec-sheet numbers
of its machine (sim/profiles/paper-2x9355-2x5090.yaml) and DeepSeek-V3's config, beside the
paper's own figures.

Each row is one run of the simulator's models (sim.predict), never a fit to the paper:
prefill through SLP on one and on two 5090s, FP8 and INT4 decode, decode under a concurrent
long prefill (both through the engine's scheduler in sim.serve, sharing the box's links), and the
dual-batch overlap gain from the per-layer attention (GPU) and expert (CPU) times.
"""

from __future__ import annotations

import statistics

from refmoe.config import ModelConfig
from sim.hardware import Hardware
from sim.predict import predict

V3 = dict(
    architectures=["DeepseekV3ForCausalLM"],
    model_type="deepseek_v3",
    vocab_size=129280,
    hidden_size=7168,
    intermediate_size=18432,
    moe_intermediate_size=2048,
    num_hidden_layers=61,
    num_attention_heads=128,
    num_key_value_heads=128,
    n_shared_experts=1,
    n_routed_experts=256,
    routed_scaling_factor=2.5,
    kv_lora_rank=512,
    q_lora_rank=1536,
    qk_rope_head_dim=64,
    v_head_dim=128,
    qk_nope_head_dim=128,
    n_group=8,
    topk_group=4,
    num_experts_per_tok=8,
    first_k_dense_replace=3,
    norm_topk_prob=True,
    max_position_embeddings=163840,
    quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"},
)


# Kimi-K2 (moonshotai/Kimi-K2-Instruct config.json): V3's layout with 64 heads, 384 experts,
# one dense layer
KIMI_K2 = dict(
    V3,
    model_type="kimi_k2",
    vocab_size=163840,
    num_attention_heads=64,
    num_key_value_heads=64,
    n_routed_experts=384,
    n_group=1,
    topk_group=1,
    first_k_dense_replace=1,
    routed_scaling_factor=2.827,
    max_position_embeddings=131072,
)


def _token_times(o) -> list[float]:
    """The time each of a request's later tokens came out."""
    t, out = o.arrived_at + o.ttft_s, []
    for gap in o.itl_s:
        t += gap
        out.append(t)
    return out


def reproduce(hw: Hardware | None = None, cfg: ModelConfig | None = None) -> list[dict]:
    hw = hw or Hardware.load("paper-2x9355-2x5090")
    cfg = cfg or ModelConfig.from_dict(V3, "DeepSeek-V3")
    rows = []

    def row(metric: str, paper: float, predicted: float, note: str = "", kind: str = "about"):
        """kind: about (within 10%), at most / at least (the paper states a bound: met when
        the prediction is on its side, with 10% slack)."""
        err = (predicted - paper) / paper
        ok = {"about": abs(err) <= 0.10, "at most": err <= 0.10, "at least": err >= -0.10}[kind]
        rows.append(
            {
                "metric": metric,
                "kind": kind,
                "paper": paper,
                "predicted": predicted,
                "error": err,
                "within_10pct": ok,
                "note": note,
            }
        )

    one = predict(cfg, hw, 32768, 2, prefill="slp", devices=1)
    row("prefill tok/s, 32K prompt, one 5090 (SLP)", 1200, 32768 / one.ttft_s, one.device_matmuls)
    row("TTFT s, 32K prompt, one 5090", 30.0, one.ttft_s, "paper: under 30 s", "at most")
    # "> 1,800 tok/s and a 45K prompt in 30 s on two (1.64x one GPU)": 45K in 30 s is 1,500
    # tok/s, so the 1,800 cannot be at 45K; 1.64 x the one-GPU 1,200 at 32K is 1,968, so the
    # rate and the speed-up are read at 32K, beside the one-GPU row
    two = predict(cfg, hw, 32768, 2, prefill="slp", devices=2)
    row(
        "prefill tok/s, 32K prompt, two 5090s (DSLP)",
        1800,
        32768 / two.ttft_s,
        "paper: more than 1,800",
        "at least",
    )
    row("two 5090s over one, 32K prompt", 1.64, one.ttft_s / two.ttft_s)
    two45 = predict(cfg, hw, 45000, 2, prefill="slp", devices=2)
    row("TTFT s, 45K prompt, two 5090s", 30.0, two45.ttft_s, "paper: 45K in 30 s")
    fp8 = predict(cfg, hw, 32, 16)
    row("decode tok/s, FP8", 21.5, fp8.decode_tok_s)
    k2 = predict(ModelConfig.from_dict(KIMI_K2, "Kimi-K2"), hw, 32, 16)
    row("decode tok/s, Kimi-K2 FP8", 22.4, k2.decode_tok_s)
    int4 = predict(cfg, hw, 32, 16, expert_bits=4.5)
    row("decode tok/s, INT4 (Q4_K class, 4.5 bits)", 28.0, int4.decode_tok_s)
    # mixed load: a request decoding while a 32K prompt prefills through SLP on the other
    # GPU, through the engine's scheduler; the two share DRAM (the stream's DMA reads), the
    # interconnect and the CPU's links
    from sim.serve import simulate

    alone, _ = simulate(cfg, hw, [(0.0, 32, 40)])
    mixed, _ = simulate(cfg, hw, [(0.0, 32, 4000), (1.0, 32768, 2)], prefill="slp")
    during = [
        t
        for t, at in zip(mixed[0].itl_s, _token_times(mixed[0]))
        if 1.0 + 0.5 < at < 1.0 + mixed[1].ttft_s - 0.5
    ]
    row(
        "decode TPOT under a long prefill / alone",
        1.15,
        max(during) / statistics.median(alone[0].itl_s),
        "paper: within 15%; worst step while a 32K SLP prefill runs on the other GPU; the "
        "model shares links only",
        "at most",
    )
    # two requests decoding together with dual-batch overlap, through the scheduler, over one
    pair, _ = simulate(cfg, hw, [(0.0, 32, 200), (0.0, 32, 200)], dual_batch="on")
    lone, _ = simulate(cfg, hw, [(0.0, 32, 200)], dual_batch="on")
    both = statistics.median(pair[1].itl_s[-100:])  # steps with both decoding
    row(
        "decode tok/s, two requests with dual-batch overlap / one",
        33.6 / 21.5,
        (2 / both) / (1 / statistics.median(lone[0].itl_s)),
        "paper: 33.6 vs 21.5 tok/s; pipelined layer by layer, no switching cost",
    )
    return rows


def format_rows(rows: list[dict]) -> str:
    out = [f"{'metric':<58} {'paper':>17} {'predicted':>10} {'error':>7}  met"]
    for r in rows:
        paper = f"{r['kind'] if r['kind'] != 'about' else '~'} {r['paper']:.2f}"
        out.append(
            f"{r['metric']:<58} {paper:>17} {r['predicted']:>10.2f} "
            f"{100 * r['error']:>+6.1f}%  {'yes' if r['within_10pct'] else 'NO'}"
            + (f"  ({r['note']})" if r["note"] else "")
        )
    return "\n".join(out)
