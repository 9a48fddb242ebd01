"""A patch-based transformer for long clinical contexts (PatchTST style, Nie et al. ICLR 2023).

The context of L steps is cut into L / patch_len patches; each patch (values, observed mask,
presence mask and time-of-day sin/cos of its steps) is embedded linearly, gets a learned position,
and a pre-norm transformer encoder mixes the patches. A flatten head maps all patch tokens to the
H forecast steps at once. Forecasts are residuals on the last input value, plus an optional
linear autoregressive skip on the most recent steps.

Attention masks: a patch without one observed reading (left padding, or a long gap kept with
split_gaps=false, or only interpolated values) is never attended to, and its token is zeroed
before the head. `causal=True` also hides later patches. Each patch may always attend to itself,
so no row of the mask is empty.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def forward(self, h: torch.Tensor, allowed: torch.Tensor, need_weights: bool = False):
        B, P, D = h.shape
        q, k, v = self.qkv(h).view(B, P, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if not need_weights:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                               dropout_p=self.dropout if self.training else 0.0)
            weights = None
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = scores.softmax(-1)
            o = F.dropout(weights, self.dropout, self.training) @ v
            weights = weights.mean(1)  # averaged over heads: [B, P, P]
        return self.out(o.transpose(1, 2).reshape(B, P, D)), weights


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor, allowed: torch.Tensor, need_weights: bool = False):
        a, w = self.attn(self.norm1(h), allowed, need_weights)
        h = h + self.drop(a)
        h = h + self.drop(self.ff(self.norm2(h)))
        return h, w


class PatchTransformer(nn.Module):
    """forward(x [B,L,C] scaled, observed [B,L], present [B,L], minute [B,L]) -> [B,H] scaled."""

    EXTRA = 4  # observed, present, sin and cos of the time of day

    def __init__(self, in_channels: int = 1, sequence_length: int = 1440, horizon: int = 12, patch_len: int = 48,
                 d_model: int = 64, n_heads: int = 4, n_layers: int = 2, d_ff: int = 128, dropout: float = 0.1,
                 causal: bool = False, linear_skip_lags: int = 24, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if patch_len < 1 or patch_len > sequence_length:
            raise ValueError(f"patch_len={patch_len} must be in [1, sequence_length={sequence_length}]")
        self.L, self.H, self.patch_len = sequence_length, horizon, patch_len
        self.pad = (-sequence_length) % patch_len
        self.num_patches = (sequence_length + self.pad) // patch_len
        self.causal = causal
        self.gradient_checkpointing = gradient_checkpointing
        self.embed = nn.Linear(patch_len * (in_channels + self.EXTRA), d_model)
        self.position = nn.Parameter(torch.randn(self.num_patches, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head_dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_patches * d_model, horizon)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.skip_lags = min(int(linear_skip_lags), sequence_length)
        if self.skip_lags > 0:
            self.skip = nn.Linear(self.skip_lags, horizon)
            nn.init.zeros_(self.skip.weight)
            nn.init.zeros_(self.skip.bias)
        causal_mask = torch.ones(self.num_patches, self.num_patches, dtype=torch.bool).tril()
        self.register_buffer("causal_mask", causal_mask, persistent=False)
        self.register_buffer("eye", torch.eye(self.num_patches, dtype=torch.bool), persistent=False)

    def patch_mask(self, observed: torch.Tensor) -> torch.Tensor:
        """[B, P] True where the patch holds at least one observed reading."""
        if self.pad:
            observed = F.pad(observed, (self.pad, 0), value=False)
        return observed.view(observed.shape[0], self.num_patches, self.patch_len).any(-1)

    def attention_mask(self, patch_valid: torch.Tensor) -> torch.Tensor:
        """[B, 1, P, P] bool, True where query patch q may attend to key patch k."""
        allowed = patch_valid[:, None, :].expand(-1, self.num_patches, -1)
        if self.causal:
            allowed = allowed & self.causal_mask
        return (allowed | self.eye)[:, None]

    def forward(self, x, observed, present, minute, return_attention: bool = False):
        B = x.shape[0]
        angle = minute * (2 * math.pi / 1440.0)
        feats = torch.cat([x * present[..., None], observed[..., None].to(x.dtype), present[..., None].to(x.dtype),
                           torch.sin(angle)[..., None], torch.cos(angle)[..., None]], -1)
        if self.pad:
            feats = F.pad(feats, (0, 0, self.pad, 0))
        patches = feats.view(B, self.num_patches, -1)
        h = self.embed(patches) + self.position
        patch_valid = self.patch_mask(observed)
        allowed = self.attention_mask(patch_valid)
        maps = []
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and not return_attention:
                h, w = checkpoint(layer, h, allowed, use_reentrant=False)
            else:
                h, w = layer(h, allowed, return_attention)
            if return_attention:
                maps.append(w)
        h = self.norm(h) * patch_valid[..., None].to(h.dtype)
        last = x[:, -1, 0]
        out = last[:, None] + self.head(self.head_dropout(h.flatten(1)))
        if self.skip_lags > 0:
            recent = (x[:, -self.skip_lags:, 0] - last[:, None]) * present[:, -self.skip_lags:].to(x.dtype)
            out = out + self.skip(recent)
        return (out, maps) if return_attention else out
