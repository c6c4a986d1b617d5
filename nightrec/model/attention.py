"""The pre-LayerNorm transformer block shared by the model's sequence prior and the SASRec peer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalBlock(nn.Module):
    """x + attn(LN(x)), then x + FFN(LN(x)), as in SASRec; ``attend`` is the boolean attention mask (True = may
    attend), so the caller decides causality and padding."""

    def __init__(self, d: int, heads: int, dropout: float, ffn_width: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self.heads, self.p = heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff = nn.Sequential(nn.Linear(d, ffn_width), activation(), nn.Dropout(dropout), nn.Linear(ffn_width, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.p if self.training else 0.0
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attend, dropout_p=p)
        x = x + self.drop(self.out(attended.transpose(1, 2).reshape(b, length, d)))
        return x + self.drop(self.ff(self.norm2(x)))
