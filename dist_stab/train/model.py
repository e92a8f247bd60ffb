"""LLaMA-style decoder: RMSNorm, RoPE, SwiGLU, untied lm_head, SDPA causal attention.

The model only declares layers; it imports nothing from ``torch.distributed``.
:mod:`dist_stab.train.parallelize` applies DDP / FSDP2 / TP to it. Attention infers the
number of local heads from the projection's output (``view(B, T, -1, head_dim)``), so a
column-sharded ``wq/wk/wv`` (TP) works unchanged.

Sizes follow the GaLore / SPAM / Stable-SPAM LLaMA configs (vocab 32000 there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    vocab_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


# name -> (dim, n_layers, n_heads, ffn_dim)
SIZES: Dict[str, tuple] = {
    "tiny-test": (64, 2, 4, 176),  # unit tests: ~0.1M params + embeddings
    "tiny-cpu": (192, 6, 6, 512),  # the CPU demo: ~2.7M params + 2*V*192 embeddings
    "20M": (384, 6, 6, 1024),  # the GPU quality study: 10.6M params + 2*V*384 embeddings (23.2M at V=16384)
    "60M": (512, 8, 8, 1376),  # GaLore llama_60m
    "130M": (768, 12, 12, 2048),  # GaLore llama_130m
    "350M": (1024, 24, 16, 2736),  # GaLore llama_350m
    "1B": (2048, 24, 32, 5461),  # GaLore llama_1b
    "7B": (4096, 32, 32, 11008),  # LLaMA-7B
}


def model_args(size: str, vocab_size: int, max_seq_len: int, **overrides) -> ModelArgs:
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; known: {sorted(SIZES)}")
    dim, n_layers, n_heads, ffn_dim = SIZES[size]
    base = dict(dim=dim, n_layers=n_layers, n_heads=n_heads, ffn_dim=ffn_dim)
    base.update({k: v for k, v in overrides.items() if v is not None})
    args = ModelArgs(vocab_size=vocab_size, max_seq_len=max_seq_len, **base)
    if args.dim % args.n_heads:
        raise ValueError(f"dim {args.dim} is not divisible by n_heads {args.n_heads}")
    if args.head_dim % 2:
        raise ValueError(f"head_dim {args.head_dim} must be even for RoPE")
    return args


def expected_num_params(a: ModelArgs) -> int:
    """Closed form: embeddings + lm_head + per block (4 d^2 attention, 3 d f MLP, 2 d norms) + final norm."""
    block = 4 * a.dim * a.dim + 3 * a.dim * a.ffn_dim + 2 * a.dim
    return 2 * a.vocab_size * a.dim + a.n_layers * block + a.dim


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hd/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, T, H, hd); rotate interleaved pairs (x0, x1) -> (x0 c - x1 s, x0 s + x1 c)
    T = x.shape[1]
    c, s = cos[:T].view(1, T, 1, -1), sin[:T].view(1, T, 1, -1)
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.type_as(x)


class Attention(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.head_dim = a.head_dim
        self.wq = nn.Linear(a.dim, a.dim, bias=False)
        self.wk = nn.Linear(a.dim, a.dim, bias=False)
        self.wv = nn.Linear(a.dim, a.dim, bias=False)
        self.wo = nn.Linear(a.dim, a.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)  # (B, T, H_local, hd)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)  # (B, H_local, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(a.dim, a.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(a.ffn_dim, a.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x, cos, sin):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        self.args = a
        self.tok_embeddings = nn.Embedding(a.vocab_size, a.dim)
        self.layers = nn.ModuleDict({str(i): Block(a) for i in range(a.n_layers)})
        self.norm = RMSNorm(a.dim, a.norm_eps)
        self.output = nn.Linear(a.dim, a.vocab_size, bias=False)  # untied lm_head
        cos, sin = rope_tables(a.head_dim, a.max_seq_len, a.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter and buffer; also used after ``to_empty`` (meta init)."""
        a = self.args
        if self.rope_cos.device.type != "meta":
            cos, sin = rope_tables(a.head_dim, a.max_seq_len, a.rope_theta, device=self.rope_cos.device)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)
        out_std = a.init_std / math.sqrt(2 * a.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=a.init_std)
        for block in self.layers.values():
            for lin in (block.attention.wq, block.attention.wk, block.attention.wv, block.feed_forward.w1,
                        block.feed_forward.w3):
                nn.init.normal_(lin.weight, std=a.init_std)
            nn.init.normal_(block.attention.wo.weight, std=out_std)
            nn.init.normal_(block.feed_forward.w2.weight, std=out_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        nn.init.normal_(self.output.weight, std=a.init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V)."""
        h = self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, self.rope_cos, self.rope_sin)
        return self.output(self.norm(h))


def build_model(a: ModelArgs, device="cpu") -> Transformer:
    """Build on the meta device, then (unless ``device`` is meta) allocate and initialise there.

    The initial weights depend only on the RNG state, whether or not the caller later shards
    the model and initialises it after sharding (``to_empty`` + ``init_weights``).
    """
    with torch.device("meta"):
        m = Transformer(a)
    if torch.device(device).type != "meta":
        m.to_empty(device=device)
        m.init_weights()
    return m


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
