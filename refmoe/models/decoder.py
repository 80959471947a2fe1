"""The decoder skeleton every family shares: embeddings, blocks, final norm and lm_head
(DecoderModel), the pre-norm residual block (Block: attention, then a dense MLP or the MoE
block), batched decode over several sequences with the dual-batch lock pair, and where the
model's device weights live.

Legend: T = tokens in this call, H = hidden, V = vocabulary, B = sequences in a batch.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from refmoe.checkpoint import Checkpoint
from refmoe.config import ModelConfig
from refmoe.models.experts import DEEPSEEK, MoE, MoENames
from refmoe.models.kv_cache import KVCache
from refmoe.models.layers import MLP, Linear, load_dense, load_norm, rms_norm, rope_parameters
from refmoe.trace import maybe


def resolve_device(name: str) -> torch.device:
    """auto: CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def move(obj, device: torch.device) -> None:
    """Put a model part's tensors (and its parts') on device; routed experts stay in host
    memory for the CPU kernels."""
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            setattr(obj, name, value.to(device))
        elif isinstance(value, Linear):
            value.to(device)
        elif isinstance(value, list):
            for item in value:
                if type(item).__module__.startswith("refmoe.models"):
                    move(item, device)
        elif type(value).__module__.startswith("refmoe.models"):
            move(value, device)


class DecoderModel:
    """Embeddings, blocks, final norm and lm_head; a family supplies make_block and the rope
    dimension. forward(token ids) -> logits, with a KV cache of the family's per-layer caches."""

    rope_dim: int

    def __init__(
        self,
        ck: Checkpoint,
        cfg: ModelConfig,
        expert_dtype: str | None = None,
        num_threads: int | None = None,
        progress=None,
        device: str = "cpu",
    ):
        self.cfg = cfg
        # how its FP8 scales are stored (Checkpoint.fp8_scales): the config read as the model
        # is (a release's text_config included) over the checkpoint's own reading of it
        ck.fp8_block, ck.fp8_block_default = cfg.fp8_block, cfg.fp8_block_default
        h, v = cfg.hidden_size, cfg.vocab_size
        self.embed = load_dense(ck, "model.embed_tokens.weight", (v, h))
        layers = range(cfg.num_hidden_layers)
        self.blocks = [
            self.make_block(ck, i, cfg, expert_dtype, num_threads)
            for i in (progress(layers) if progress else layers)
        ]
        self.norm = load_norm(ck, "model.norm.weight", h, cfg)
        self.head = (
            None
            if cfg.tie_word_embeddings and "lm_head.weight" not in ck
            else Linear(ck, "lm_head.weight", (v, h))
        )
        self.inv_freq, self.rope_factor, self.softmax_scale = rope_parameters(cfg, self.rope_dim)
        self.trace = None  # a refmoe.trace.Trace to record per-layer spans into, or None
        self.device = resolve_device(device)
        if self.device.type != "cpu":
            move(self, self.device)
            # float32 projections on a GPU run on its tensor cores (TF32), as inference
            # engines do; the CPU path keeps full float32
            torch.backends.cuda.matmul.allow_tf32 = True

    def make_block(self, ck, layer, cfg, expert_dtype, num_threads):
        raise NotImplementedError

    def _rope(self, start: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + t, dtype=torch.float32, device=self.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, rope/2]
        return freqs.cos() * self.rope_factor, freqs.sin() * self.rope_factor

    @torch.no_grad()
    def forward_batch(
        self, ids: list[torch.Tensor], caches: list[KVCache], locks=None
    ) -> torch.Tensor:
        """Several sequences in one pass: ids[i] [T_i] after caches[i]. Attention runs per
        sequence over its own cache; the MoE layers run once over every sequence's tokens, so
        each expert's weights are read once for the batch. Returns the logits of each
        sequence's last position, [B, V]. locks: (attention, experts) locks held around each
        layer's two halves, so that two batches in two threads alternate (dual-batch overlap)."""
        ropes = [self._rope(c.length, i.shape[0]) for i, c in zip(ids, caches)]
        xs = [self.embed[i.to(self.device)] for i in ids]
        for layer, block in enumerate(self.blocks):
            xs = block.batch(
                xs, ropes, self.softmax_scale, [c.layers[layer] for c in caches], self.trace, locks
            )
        return self._head(torch.stack([x[-1] for x in xs]))  # [B, V]

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm and lm_head (or the tied embeddings): x [T, H] -> logits [T, V]."""
        x = rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        return x @ self.embed.T if self.head is None else self.head(x)

    def _logits(self, x: torch.Tensor, logits: str) -> torch.Tensor:
        """forward's logits of the last hidden states x [T, ...] (see forward: all, last,
        none)."""
        if logits != "all":
            x = x[-1:] if logits == "last" else x[:0]
        if x.shape[0] == 0:
            return torch.zeros((0, self.cfg.vocab_size), device=self.device)
        return self._head(x)

    def kv_bytes_per_token(self) -> int:
        """Host or device bytes one cached token takes, all layers together."""
        return sum(block.attn.cache_bytes_per_token() for block in self.blocks)

    def state_bytes(self) -> int:
        """The fixed cache one sequence keeps beside its growing ones: linear-attention layers'
        states and sliding-window layers' windows."""
        return sum(getattr(b.attn, "state_bytes", lambda: 0)() for b in self.blocks)

    def new_cache(self) -> KVCache:
        return KVCache([block.attn.new_cache() for block in self.blocks])

    @torch.no_grad()
    def forward(
        self, ids: torch.Tensor, cache: KVCache, experts=None, cp=None, logits: str = "all"
    ) -> torch.Tensor:
        """ids [T] (the next T tokens after the cache) -> logits [T, V] float32.
        experts: a refmoe.slp chunk that runs the routed experts (stream-loading prefill).
        cp: a refmoe.dslp.ContextParallel when the chunk is split across ranks: ids are this
        rank's slice, at cp.offset within the chunk; every rank's cache gets the whole chunk.
        logits: "all" positions', the "last" one's only ([1, V]; [0, V] for no ids), or
        "none" ([0, V]: a chunk whose states only go into the cache): a prefill that samples
        one token skips the LM head over the rest of the prompt (T x V x H multiply-adds, as
        much as a layer's experts on a short prompt)."""
        if logits not in ("all", "last", "none"):
            raise ValueError(f"logits must be all, last or none, got {logits!r}")
        t, ids = ids.shape[0], ids.to(self.device)
        first = cache.length + (cp.offset if cp is not None else 0)
        pos = torch.arange(first, first + t, dtype=torch.float32, device=self.device)
        freqs = pos[:, None] * self.inv_freq[None, :]  # [T, rope/2]
        cos, sin = freqs.cos() * self.rope_factor, freqs.sin() * self.rope_factor
        x = self.embed[ids]  # [T, H]
        try:
            for block, layer_cache in zip(self.blocks, cache.layers):
                x = block(x, cos, sin, self.softmax_scale, layer_cache, self.trace, experts, cp)
        finally:
            if experts is not None:
                experts.close()
        return self._logits(x, logits)


class Block:
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def batch(
        self, xs: list[torch.Tensor], ropes, softmax_scale, caches, trace=None, locks=None
    ) -> list[torch.Tensor]:
        """Several sequences: attention over each one's own cache (its projections batched),
        then the FFN over all their tokens at once (see DecoderModel.forward_batch)."""
        attn_lock, ffn_lock = locks or (nullcontext(), nullcontext())
        tokens = sum(x.shape[0] for x in xs)
        with (
            attn_lock,
            maybe(
                trace,
                "device",
                "attention",
                f"attention L{self.layer}",
                tokens=tokens,
                sequences=len(xs),
            ),
        ):
            ys = self.attn.batch(
                [rms_norm(x, self.attn_norm, self.eps) for x in xs], ropes, softmax_scale, caches
            )
            xs = [x + y for x, y in zip(xs, ys)]
        sizes = [x.shape[0] for x in xs]
        x = torch.cat(xs)
        moe = isinstance(self.ffn, MoE)
        lane = "experts" if moe else "dense mlp"
        with (
            ffn_lock,
            maybe(
                trace,
                "cpu" if moe else "device",
                lane,
                f"{lane} L{self.layer}",
                tokens=tokens,
                sequences=len(xs),
            ),
        ):
            x = x + self.ffn(rms_norm(x, self.ffn_norm, self.eps))
        return list(x.split(sizes))

    def __init__(
        self,
        ck: Checkpoint,
        layer: int,
        cfg: ModelConfig,
        attn,
        expert_dtype,
        num_threads,
        ffn: str = "mlp",
        names: MoENames = DEEPSEEK,
    ):
        """ffn: the name of the layer's MLP or MoE block (MiniMax: block_sparse_moe); names:
        where its MoE block keeps its tensors."""
        p = f"model.layers.{layer}"
        self.layer, self.eps = layer, cfg.rms_norm_eps
        self.attn_norm = load_norm(ck, f"{p}.input_layernorm.weight", cfg.hidden_size, cfg)
        self.ffn_norm = load_norm(ck, f"{p}.post_attention_layernorm.weight", cfg.hidden_size, cfg)
        self.attn = attn
        self.ffn = (
            MoE(ck, f"{p}.{ffn}", cfg, expert_dtype, num_threads, names)
            if cfg.is_moe_layer(layer)
            else MLP(ck, f"{p}.{ffn}", cfg.hidden_size, cfg.intermediate_size)
        )

    def __call__(
        self, x, cos, sin, softmax_scale, cache, trace=None, streamed=None, cp=None
    ) -> torch.Tensor:
        tokens = x.shape[0]
        with maybe(trace, "device", "attention", f"attention L{self.layer}", tokens=tokens):
            x = x + self.attn(
                rms_norm(x, self.attn_norm, self.eps), cos, sin, softmax_scale, cache, cp
            )
        moe = isinstance(self.ffn, MoE)
        lane = "experts" if moe else "dense mlp"
        where = ("slp" if streamed is not None else "cpu") if moe else "device"
        with maybe(trace, where, lane, f"{lane} L{self.layer}", tokens=tokens):
            xn = rms_norm(x, self.ffn_norm, self.eps)
            ffn = self.ffn
            return x + (ffn(xn, streamed, self.layer) if isinstance(ffn, MoE) else ffn(xn))


def smoke(transformer: type[DecoderModel]) -> None:
    """python -m refmoe.models.FAMILY MODEL_DIR: load the model, print the last logits' top 5
    after three tokens."""
    import sys

    cfg = ModelConfig.from_file(sys.argv[1])
    model = transformer(Checkpoint(sys.argv[1]), cfg)
    logits = model.forward(torch.tensor([1, 2, 3]), model.new_cache())
    print(logits.shape, logits[-1].topk(5))
