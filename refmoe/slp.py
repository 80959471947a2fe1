"""Stream-loading prefill (SLP): routed experts of a long prompt computed on the device, with
their weights streamed from the one host copy into a reusable ring of expert slots.

Three lanes, ordered only by events (never by waiting on the whole device):

    loader    copies expert j's bytes (codes and scales, one contiguous row of the layer's
              packed host buffer) into ring slot j % n, once expert j - n has left that slot;
    compute   runs expert j's MLP over the tokens routed to it, into output buffer j % 2;
    unloader  adds that output, weighted, into the layer's result, freeing the buffer.

Requests j run in one order on every lane: layer by layer, expert by expert. When the chunk
is long enough that every expert is expected to be hit, the order is known in advance and the
loader runs ahead into the next layer while this one computes ("prefetch"); for short chunks
only the experts the chunk routes to are streamed, once this layer's router has run
("selective"). On the CPU the ring holds two layers; on CUDA it holds CUDA_QUEUE_SLOTS (see
there), fewer when device memory is short, down to two.

On CUDA the lanes are streams and events and the host buffer is pinned; on a machine without
one the "device" is the CPU, the ring lives in host memory and the loader and unloader are
threads: the same requests, order, ring reuse and trace lanes, tested everywhere.

Legend: T = tokens in the chunk, H = hidden, I = expert intermediate, E = expert slots of a
layer (routed, plus the shared expert where it is fused), n = ring slots.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from refmoe import costmodel, expert_store
from refmoe.device_matmul import Matmul, block_dequant, compute_dtype
from refmoe.expert_store import ALIGN, Part, SlotLayout, pack_host, pack_model
from refmoe.slp_lanes import CpuLanes, CudaLanes, _Spans

_block_dequant = block_dequant  # the name tests and older callers use
__all__ = [
    "ALIGN",
    "CUDA_QUEUE_SLOTS",
    "CpuLanes",
    "CudaLanes",
    "Matmul",
    "Part",
    "Ring",
    "SlotLayout",
    "Stats",
    "StreamPrefill",
    "block_dequant",
    "model_rates",
    "pack_host",
    "pack_model",
    "pcie_bound_tok_s",
    "ring_slots",
    "streamable",
]

# On CUDA every load is queued on the copy engine when it is issued, and each small
# host<->device copy the forward pass makes waits behind what is queued. A ring of a whole
# layer or more, issued at once, put ~0.2-0.4 s of copies ahead of them; 8 slots (~350 MB of
# DeepSeek experts, ~7 ms at 54 GB/s) keep the copy engine busy without that. Measured on an
# H100 (docs/slp.md): 2 layers x 257 experts, 4,096 tokens, 0.57 of the PCIe bound with 514
# slots, 0.96 with 8. Memory still caps the ring (ring_slots), down to two.
CUDA_QUEUE_SLOTS = 8


# ---------------------------------------------------------------------------------------------
# The ring: n slots of one layout on the device (the layout and the host copy: expert_store;
# the products: device_matmul; the lanes: slp_lanes)
# ---------------------------------------------------------------------------------------------


class Ring:
    """n slots of one layout on the device, each viewed as the expert's tensors."""

    def __init__(self, layout: SlotLayout, slots: int, device: torch.device):
        self.layout, self.slots = layout, slots
        self.buf = torch.empty((slots, layout.nbytes), dtype=torch.uint8, device=device)
        torch_dtype = {
            "fp8": torch.float8_e4m3fn,
            "bf16": torch.bfloat16,
            "f32": torch.float32,
            "u8": torch.uint8,
        }
        self.views = [
            {
                p.name: self.buf[s, p.offset : p.offset + p.nbytes]
                .view(torch_dtype[p.dtype])
                .view(p.shape)
                for p in layout.parts
            }
            for s in range(slots)
        ]


# ---------------------------------------------------------------------------------------------
# The runner: one prefill, chunk by chunk
# ---------------------------------------------------------------------------------------------


def ring_slots(
    layout: SlotLayout, experts_per_layer: int, free_bytes: int, reserve_bytes: int
) -> int:
    """Two whole layers when they fit in the free memory left after the reserve, else as many
    slots as fit, at least two (ping-pong)."""
    fit = max(0, free_bytes - reserve_bytes) // layout.nbytes
    return int(max(2, min(2 * experts_per_layer, fit)))


@dataclass(slots=True)
class Stats:
    bytes_streamed: int = 0
    experts_loaded: int = 0
    experts_skipped: int = 0
    chunks: int = 0
    seconds: float = 0.0
    mode: str = ""
    slots: int = 0
    matmul: str = ""


class StreamPrefill:
    """Runs a model's prefill with its routed experts on `device` through SLP.

    model: a refmoe DecoderModel (attention and dense layers run where the model put them).
    owned: which expert slots this runner computes (DSLP gives each device a share; default
    all). ring: the number of slots (default: sized to free device memory). chunk_tokens:
    the longest chunk (default: 32768 tokens on CUDA, 8192 on the CPU)."""

    def __init__(
        self,
        model,
        device: str | torch.device | None = None,
        ring: int | None = None,
        chunk_tokens: int | None = None,
        trace=None,
        pin: bool | None = None,
        owned=None,
        mode: str = "auto",
    ):
        self.model = model
        self.device = torch.device(device) if device is not None else model.device
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("SLP device cuda: CUDA is not available on this machine")
        self.dtype = compute_dtype(self.device)
        if mode not in ("auto", "prefetch", "selective"):
            raise ValueError(f"SLP mode must be auto, prefetch or selective, got {mode!r}")
        self.mode = mode
        self.moe = [(b.layer, b.ffn) for b in model.blocks if hasattr(b.ffn, "experts")]
        self._activations: dict[int, ExpertActivation] = {}
        if not self.moe:
            raise ValueError("the model has no MoE layers to stream")
        # CUDA: the loader streams the one host copy as packed at load into pinned memory
        # (expert_store.pack_model; async copies need it). CPU: straight from the checkpoint's
        # mapped pages, which every process shares, unless pin asks for the packed copy. The
        # runner never packs the model itself: it names what is missing.
        self.packed = self.device.type == "cuda" if pin is None else pin
        for _, moe in self.moe:
            if self.packed and (
                moe.packed is None or (self.device.type == "cuda" and not moe.packed.is_pinned())
            ):
                raise ValueError(
                    f"SLP on {self.device}: the model's experts are not packed"
                    f"{' into pinned memory' if self.device.type == 'cuda' else ''}; load the "
                    "model on that device, or call refmoe.expert_store.pack_model(model, pin="
                    f"{self.device.type == 'cuda'}) first"
                )
        self.layout = SlotLayout.of(self.moe[0][1].experts)
        self.slots_per_layer = self.moe[0][1].experts.num_experts
        self.owned = owned or (lambda e: True)
        # the longest chunk: every chunk streams the experts again, so as long as the
        # activations and attention allow (see _reserve_bytes)
        self.chunk_tokens = (
            chunk_tokens
            or costmodel.SLP_CHUNK_TOKENS["cuda" if self.device.type == "cuda" else "cpu"]
        )
        self.ring_request = ring
        self.trace = trace
        self.matmul = Matmul(self.device, self.dtype)
        self.stats = Stats(matmul=self.matmul.kind)
        self._ring: Ring | None = None

    # -- sizing ---------------------------------------------------------------------------

    def activation(self, layer: int) -> ExpertActivation:
        """The activation (and biases, on the device) of layer's experts, made once."""
        if layer not in self._activations:
            moe = dict(self.moe)[layer]
            self._activations[layer] = ExpertActivation(moe.experts, self.device)
        return self._activations[layer]

    def _reserve_bytes(self, tokens: int) -> int:
        cfg = self.model.cfg
        h, i = cfg.hidden_size, cfg.moe_intermediate_size
        # layer input and result (float32), two output buffers, one expert's intermediates
        return tokens * (h * 4 * 2 + h * 2 * 2 + i * 4 * 3) + 512 * 2**20

    def _ring_for(self, tokens: int) -> Ring:
        if self.ring_request is not None:
            slots = max(2, int(self.ring_request))
        elif self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            slots = min(
                CUDA_QUEUE_SLOTS,
                ring_slots(
                    self.layout,
                    self.slots_per_layer,
                    free + (self._ring.buf.numel() if self._ring is not None else 0),
                    self._reserve_bytes(tokens),
                ),
            )
        else:
            slots = 2 * self.slots_per_layer
        if self._ring is None or self._ring.slots != slots:
            self._ring = None
            self._ring = Ring(self.layout, slots, self.device)
        return self._ring

    # -- one prefill --------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(
        self,
        ids: torch.Tensor,
        cache,
        modes: tuple[str, ...] | None = None,
        all_logits: bool = True,
    ) -> torch.Tensor:
        """Logits [T, V] of the prompt ids [T] after the cache, the cache extended; chunk by
        chunk, the cache carried over. modes: each chunk's streaming as a plan gives it
        (refmoe.policy), else this runner's mode. all_logits=False: the last position's
        only, [1, V] (the LM head runs once, not per prompt token)."""
        start = time.perf_counter()
        out = []
        # the ids go up before the chunk queues its loads: a small copy issued later would wait
        # behind gigabytes of expert weights in the copy engine's queue
        ids = ids.to(self.model.device)
        starts = range(0, ids.shape[0], self.chunk_tokens)
        if modes is not None and len(modes) != len(starts):
            raise ValueError(
                f"the plan gives {len(modes)} chunk modes for {len(starts)} chunks "
                f"of {self.chunk_tokens} tokens"
            )
        for i, lo in enumerate(starts):
            chunk = ids[lo : lo + self.chunk_tokens]
            mode = modes[i] if modes is not None else None
            t0, streamed = time.perf_counter(), self.stats.bytes_streamed
            at = self.trace.now() if self.trace is not None else 0.0
            which = (
                "all" if all_logits else "last" if lo + self.chunk_tokens >= len(ids) else "none"
            )
            out.append(
                self.model.forward(
                    chunk, cache, experts=self._chunk(chunk.shape[0], mode), logits=which
                )
            )
            self.stats.chunks += 1
            if self.trace is not None:  # the link's average load over the chunk, as a track
                gbps = (self.stats.bytes_streamed - streamed) / (time.perf_counter() - t0) / 1e9
                lane = f"slp {self.device}"
                self.trace.counter(lane, "h2d GB/s", at, gbps=float(f"{gbps:.6g}"))
                self.trace.counter(lane, "h2d GB/s", self.trace.now(), gbps=0.0)
        self.stats.seconds += time.perf_counter() - start
        return torch.cat(out) if len(out) > 1 else out[0]  # "none" chunks add no rows

    def _chunk(self, tokens: int, mode: str | None = None, exchange=None) -> _Chunk:
        ring = self._ring_for(tokens)
        e = self.slots_per_layer
        cfg = self.model.cfg
        mode = mode or self.mode
        if mode == "auto":
            mode = costmodel.streaming(cfg, tokens)
        self.stats.mode, self.stats.slots = mode, ring.slots
        spans = _Spans(self.trace, f"slp {self.device}")
        lanes = (
            CudaLanes(ring.slots, spans, self.device)
            if self.device.type == "cuda"
            else CpuLanes(ring.slots, spans)
        )
        plan = (
            [(layer, x) for layer, _ in self.moe for x in range(e) if self.owned(x)]
            if mode == "prefetch"
            else None
        )
        return _Chunk(self, ring, lanes, plan, exchange or _Local())


class _Local:
    """The exchange of a chunk that one device runs whole: nothing to gather or scatter."""

    @staticmethod
    def gather(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def reduce_scatter(y: torch.Tensor) -> torch.Tensor:
        return y


class _Chunk:
    """The requests of one chunk and where each lane is in them. The model calls
    layer(...) for each MoE layer in order; close() runs when the forward pass ends.
    exchange: how this rank's tokens meet the others' around each MoE layer (gather before the
    router, reduce_scatter of the summed experts after; DSLP's ContextParallel), or _Local."""

    def __init__(self, runner: StreamPrefill, ring: Ring, lanes, plan, exchange):
        self.runner, self.ring, self.lanes, self.plan = runner, ring, lanes, plan
        self.exchange = exchange
        self.requests: list[tuple[int, int]] = list(plan) if plan is not None else []
        self.next_load = 0
        self.next_compute = 0
        self.experts = {layer: moe for layer, moe in runner.moe}
        self._issue_loads()

    def _issue_loads(self) -> None:
        """Issue every load whose slot is free or will be freed by a compute already issued."""
        limit = self.next_compute + self.ring.slots
        while self.next_load < min(len(self.requests), limit):
            j = self.next_load
            layer, e = self.requests[j]
            self.lanes.load(j, self._copier(layer, e, j % self.ring.slots), f"load L{layer} E{e}")
            self.runner.stats.bytes_streamed += self.ring.layout.nbytes
            self.runner.stats.experts_loaded += 1
            self.next_load += 1

    def moe(self, moe, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MoE block's output for this rank's x [t, H] (its router over every rank's tokens,
        the streamed routed experts, its shared expert), where x lives."""
        x_all = self.exchange.gather(x)  # [T, H]
        weights, ids = moe.route(x_all)  # same on every rank
        y = self.layer(
            layer, x_all, weights, ids, moe.experts.num_experts - 1 if moe.fused_shared else None
        )
        y = self.exchange.reduce_scatter(y.to(x.device, torch.float32)).to(x.dtype)  # [t, H]
        return y + moe.shared_out(x)

    def _copier(self, layer: int, e: int, slot: int):
        """A function that copies expert e of the layer into the slot: one contiguous row of
        the packed buffer, or part by part from the checkpoint's mapped arrays."""
        moe, dst = self.experts[layer], self.ring.buf[slot]
        if self.runner.packed:
            src, non_blocking = moe.packed[e], self.runner.device.type == "cuda"
            return lambda: dst.copy_(src, non_blocking=non_blocking)
        layout = self.ring.layout
        parts = layout.sources(moe.experts, e)
        dst_np = dst.numpy()

        def copy():
            for part, src in zip(layout.parts, parts):
                dst_np[part.offset : part.offset + part.nbytes] = src

        return copy

    def layer(
        self,
        layer: int,
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        shared_slot: int | None,
    ) -> torch.Tensor:
        """y [T, H] float32 on the device = the owned experts' weighted sum for x [T, H]."""
        r = self.runner
        dev = r.device
        t = x.shape[0]
        # assignments grouped by expert, on the device: nothing goes host -> device here (it
        # would queue behind the expert loads); only the per-expert counts come back
        ids, weights = ids.to(dev), weights.to(dev, torch.float32)
        tok = torch.arange(t, device=dev).repeat_interleave(ids.shape[1])
        exp, w = ids.reshape(-1), weights.reshape(-1)
        if shared_slot is not None:
            tok = torch.cat([tok, torch.arange(t, device=dev)])
            exp = torch.cat([exp, torch.full((t,), shared_slot, device=dev, dtype=exp.dtype)])
            w = torch.cat([w, torch.ones(t, device=dev)])
        order = torch.argsort(exp, stable=True)
        tok_d, w_d = tok[order], w[order]
        counts = torch.bincount(exp, minlength=r.slots_per_layer).cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(counts)])
        xd = x.to(dev, r.dtype)
        y = torch.zeros((t, x.shape[1]), dtype=torch.float32, device=dev)
        experts = r.moe[0][1].experts
        act = r.activation(layer)
        fmt, group, block = experts.fmt, experts.group_size, experts.fp8_block
        hidden, inter = experts.hidden, experts.intermediate
        if self.plan is None:  # selective: routed experts
            self.requests += [
                (layer, e) for e in range(r.slots_per_layer) if counts[e] and r.owned(e)
            ]
            self._issue_loads()
        out = [
            torch.empty((int(counts.max()), x.shape[1]), dtype=r.dtype, device=dev)
            for _ in range(2)
        ]
        last = self.next_compute - 1
        while (
            self.next_compute < len(self.requests) and self.requests[self.next_compute][0] == layer
        ):
            j = self.next_compute
            e = self.requests[j][1]
            n = int(counts[e])
            if n == 0:
                self.lanes.skip(j)
                r.stats.experts_skipped += 1
            else:
                sl = slice(int(bounds[e]), int(bounds[e + 1]))
                views = self.ring.views[j % self.ring.slots]
                buf = out[j % 2]
                idx, wt = tok_d[sl], w_d[sl]

                def compute(views=views, buf=buf, idx=idx, wt=wt, n=n, e=e):
                    xe = xd[idx]  # [n, H]
                    g = r.matmul.expert(xe, views, "gate", fmt, hidden, group, block)
                    u = r.matmul.expert(xe, views, "up", fmt, hidden, group, block)
                    h = act(e, g.float(), u.float())
                    d = r.matmul.expert(h.to(r.dtype), views, "down", fmt, inter, group, block)
                    if act.down is not None:
                        d = d.float() + act.down[e]
                    buf[:n] = (d.float() * wt[:, None]).to(r.dtype)

                def unload(buf=buf, idx=idx, n=n):
                    y.index_add_(0, idx, buf[:n].float())

                self.lanes.compute(j, compute, f"experts L{layer} E{e} ({n} tok)")
                self.lanes.unload(j, unload, f"add L{layer} E{e}")
                if dev.type == "cuda":
                    for tensor in (idx, buf, y):
                        tensor.record_stream(self.lanes.unload_stream)
            last = j
            self.next_compute += 1
            self._issue_loads()
        self.lanes.finish_layer(last)
        return y

    def close(self) -> None:
        self.lanes.close()


def pcie_bound_tok_s(tokens: int, nbytes: int, gbps: float) -> float:
    """Prefill tok/s if streaming the bytes at the measured bandwidth were all it took."""
    return tokens / (nbytes / (gbps * 1e9)) if nbytes else math.inf


def model_rates(model, device: str | None = None):
    """The cost model's rates for this model on `device`, measured once (about a second) and
    kept on the model."""
    from refmoe import costmodel

    dev = torch.device(device) if device is not None else model.device
    cached = getattr(model, "prefill_rates", {})
    if str(dev) not in cached:
        model.prefill_rates = {**cached, str(dev): costmodel.measure_rates(model.cfg, dev)}
    return model.prefill_rates[str(dev)]


class ExpertActivation:
    """The experts' activation as the CPU kernels apply it (ExpertWeights.activation), in torch
    on the SLP device: silu(g) * u, gpt-oss's clamped SwiGLU or DeepSeek-V4's clamped SiLU,
    with the per-expert gate/up
    biases added first and the down bias (`down`, [E, H]) after the down projection."""

    def __init__(self, experts, device: torch.device):
        self.kind, self.alpha, self.limit = experts.activation, experts.alpha, experts.limit

        def stacked(biases):
            return torch.from_numpy(np.stack(biases)).to(device) if biases else None

        self.gate, self.up = stacked(experts.gate_bias), stacked(experts.up_bias)
        self.down = stacked(experts.down_bias)

    def __call__(self, e: int, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """g, u [n, I] float32 for expert slot e -> h [n, I]."""
        if self.gate is not None and self.up is not None:
            g, u = g + self.gate[e], u + self.up[e]
        if self.kind == "swiglu_oai":
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
            return (u + 1) * g * torch.sigmoid(self.alpha * g)
        if self.kind == "silu_clamp":
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return F.silu(g) * u


def streamable(model) -> bool:
    """Whether SLP can stream this model's routed experts: it has MoE layers and each one's
    experts are in a slot format (expert_store.streamable: FP8, BF16 or a 4-bit format as
    stored, not refmoe's own INT4)."""
    moes = [b.ffn for b in model.blocks if hasattr(b.ffn, "experts")]
    return bool(moes) and all(expert_store.streamable(m) for m in moes)
