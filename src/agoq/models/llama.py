"""A small, clean LLaMA (RMSNorm, RoPE, GQA, SDPA, SwiGLU) with torchtitan's module names.

Used by agoq's tests, benchmarks and demo. Names follow torchtitan's llama3
(``tok_embeddings``, ``layers.N.attention.wq``, ``layers.N.feed_forward.w1``, ``norm``,
``output``) so the same activation plan rules match both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LlamaConfig:
    """Model shape. ``hidden_dim`` defaults to LLaMA's 2/3 * 4 * dim rounded up."""

    dim: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None
    vocab_size: int = 1024
    hidden_dim: int | None = None
    multiple_of: int = 32
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048

    def __post_init__(self) -> None:
        kv = self.n_kv_heads or self.n_heads
        if self.dim % self.n_heads:
            raise ValueError(
                f"LlamaConfig.dim={self.dim} must be divisible by n_heads={self.n_heads}"
            )
        if self.n_heads % kv:
            raise ValueError(
                f"LlamaConfig.n_heads={self.n_heads} must be divisible by n_kv_heads={kv}"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError("LlamaConfig: head dimension must be even for RoPE")

    @property
    def ffn_dim(self) -> int:
        """Width of the SwiGLU hidden layer."""
        if self.hidden_dim is not None:
            return self.hidden_dim
        h = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(h / self.multiple_of)


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256),
    "small": LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1024),
    "base": LlamaConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=4096),
}


def rope_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, shape (seq_len, head_dim // 2)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) of the last dim; x is (batch, seq, heads, head_dim).

    Computed in fp32 against the fp32 tables: the products by cos/sin (buffers) save only
    the buffers for backward, so RoPE adds no activation memory.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).type_as(x)


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads and rotary embeddings."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` (batch, seq, dim)."""
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, t, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    """SwiGLU MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to ``x`` (batch, seq, dim)."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(.))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """One transformer layer."""
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Llama(nn.Module):
    """Decoder-only LLaMA returning logits (batch, seq, vocab)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """LLaMA-style init: normal(0, 0.02), output projections scaled by depth."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)
                continue
            std = 0.02
            if name.endswith(("wo.weight", "w2.weight")):
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits for ``tokens`` (batch, seq) of int64 ids."""
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds max_seq_len={self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.output(self.norm(h))


def build(name_or_cfg: str | LlamaConfig = "small", **overrides: int | float) -> Llama:
    """A reference LLaMA from a preset name or a config, with field overrides."""
    if isinstance(name_or_cfg, str):
        if name_or_cfg not in PRESETS:
            raise ValueError(f"unknown model preset {name_or_cfg!r}; choose from {sorted(PRESETS)}")
        cfg = PRESETS[name_or_cfg]
    else:
        cfg = name_or_cfg
    if overrides:
        cfg = LlamaConfig(**{**cfg.__dict__, **overrides})
    return Llama(cfg)


class LlamaStage(nn.Module):
    """Pipeline stage ``index`` of ``num_stages``: a contiguous slice of ``model``'s layers,
    with the embedding on the first stage and the final norm and head on the last.

    Input: token ids on the first stage, hidden states elsewhere. Shares ``model``'s modules.
    """

    def __init__(self, model: Llama, index: int, num_stages: int) -> None:
        super().__init__()
        n = model.cfg.n_layers
        if not 0 <= index < num_stages or n % num_stages:
            raise ValueError(
                f"LlamaStage: {n} layers cannot be split into {num_stages} equal stages "
                f"(or index {index} out of range)"
            )
        per = n // num_stages
        first, last = index == 0, index == num_stages - 1
        self.tok_embeddings = model.tok_embeddings if first else None
        self.layers = nn.ModuleDict(
            {str(i): model.layers[str(i)] for i in range(index * per, (index + 1) * per)}
        )
        self.norm = model.norm if last else None
        self.output = model.output if last else None
        self.register_buffer("rope_cos", model.rope_cos.clone(), persistent=False)
        self.register_buffer("rope_sin", model.rope_sin.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids or hidden states in, hidden states or logits out."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        t = h.shape[1]
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.output(self.norm(h)) if self.output is not None else h
