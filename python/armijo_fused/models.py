r"""A small reference transformer for the demo, the tests and the benchmarks.

Decoder-only language model in the spirit of the single-GPU recipes (nanoGPT and its
descendants): pre-norm residual blocks with RMSNorm, no biases, no dropout, learned positions,
causal self-attention through ``F.scaled_dot_product_attention`` and a GELU MLP; the output head
shares the token-embedding matrix (tied embeddings). For token ids x_1..x_T,

.. math::
    h_0 = W_E[x] + P_{1..T}, \quad
    a_l = h_{l-1} + \mathrm{Attn}_l(\mathrm{RMS}(h_{l-1})), \quad
    h_l = a_l + \mathrm{MLP}_l(\mathrm{RMS}(a_l)), \quad
    \mathrm{logits} = \mathrm{RMS}(h_L)\, W_E^\top

``rezero=True`` removes every norm and gates each residual branch by a learnable scalar that
starts at 0 (Bachlechner et al., ReZero): :math:`h \leftarrow h + \alpha \cdot F(h)`,
:math:`\alpha_0 = 0`. At initialisation the network is the identity on the embeddings, so every
parameter inside a branch has an exactly zero gradient and only the gates and the embeddings
move on the first step — a case the line search has to survive (⟨g, d⟩ comes from a few
scalars).

Module names follow :mod:`armijo_fused.blocks`: ``wte`` / ``wpe`` (block ``embeddings``),
``layers.<i>`` (block ``layer.<i>``), ``norm`` (block ``final``) and ``lm_head`` (block ``head``;
with tied embeddings its weight is ``wte.weight`` and is reported once, under ``embeddings``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TransformerConfig", "TransformerLM", "Block", "gpt2_small_like", "tiny"]


@dataclass
class TransformerConfig:
    """Shape of :class:`TransformerLM`.

    Attributes:
        vocab_size: number of token ids
        context: longest sequence (size of the learned position table)
        d_model: width of the residual stream
        n_layers: number of transformer blocks
        n_heads: attention heads (``d_model`` must be a multiple)
        mlp_ratio: MLP hidden width over ``d_model``
        rezero: gate each residual branch by a scalar initialised to 0 and drop all norms
        tie_embeddings: the head reuses the token-embedding matrix
        init_std: standard deviation of the normal initialisation (GPT-2's 0.02); residual output
            projections are further scaled by 1/√(2·n_layers) so the stream's variance does not
            grow with depth
        norm_eps: RMSNorm's ε
    """

    vocab_size: int = 96
    context: int = 128
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: float = 4.0
    rezero: bool = False
    tie_embeddings: bool = True
    init_std: float = 0.02
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "context", "d_model", "n_layers", "n_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"invalid {name}: {v!r} (expected an int >= 1)")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})"
            )
        if not self.mlp_ratio > 0:
            raise ValueError(f"invalid mlp_ratio: {self.mlp_ratio!r} (expected > 0)")


def gpt2_small_like(vocab_size: int = 50304, context: int = 1024) -> TransformerConfig:
    """GPT-2 small's shape (12 layers, width 768, 12 heads; ≈124M parameters with the GPT-2
    vocabulary padded to 50304), for the GPU step benchmark."""
    return TransformerConfig(vocab_size=vocab_size, context=context, d_model=768, n_layers=12,
                             n_heads=12)


def tiny(vocab_size: int = 96, context: int = 32, rezero: bool = False) -> TransformerConfig:
    """Two layers of width 32: for tests and smoke runs (≈30k parameters with 96 tokens)."""
    return TransformerConfig(vocab_size=vocab_size, context=context, d_model=32, n_layers=2,
                             n_heads=2, rezero=rezero)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One residual block: pre-norm (x + F(RMS(x))) or ReZero (x + α·F(x), α₀ = 0)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.rezero = cfg.rezero
        if cfg.rezero:
            # the gates: 0-dim so they are single scalars; zero so the block starts as identity
            self.attn_gate = nn.Parameter(torch.zeros(()))
            self.mlp_gate = nn.Parameter(torch.zeros(()))
        else:
            self.attn_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        if self.rezero:
            x = x + self.attn_gate * self.attn(x)
            return x + self.mlp_gate * self.mlp(x)
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TransformerLM(nn.Module):
    """Decoder-only language model (see the module docstring for the equations).

    ``forward(idx)`` returns logits of shape (B, T, vocab); ``forward(idx, targets)`` returns the
    mean next-token cross-entropy (a scalar), which is what optimizer closures want.
    """

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        # registration order matters: the tied matrix is named after the first owner (wte)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.context, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = None if cfg.rezero else nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue  # RMSNorm weights keep their ones, ReZero gates their zero
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("proj.weight") else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def num_parameters(self) -> int:
        """Distinct parameters (the tied matrix counted once)."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> Tensor:
        B, T = idx.shape
        if T > self.cfg.context:
            raise ValueError(f"sequence length {T} exceeds the model's context {self.cfg.context}")
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.layers:
            x = block(x)
        if self.norm is not None:
            x = self.norm(x)
        logits = self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
