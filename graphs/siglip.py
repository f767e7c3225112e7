"""SigLIP vision tower (So400m/14 at full size). Submodule names match the checkpoint keys under
`...vision_tower.vision_model.` so weights load without renaming inside the tower."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import SiglipConfig
from .layers import fuse_linears


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.tokens_per_image, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, H, W] in [-1, 1] -> patch tokens [N, T, D]."""
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # [N, D, h, w]
        tokens = patches.flatten(2).transpose(1, 2)
        return tokens + self.position_embedding.weight.to(tokens.dtype)[None]


class SiglipAttention(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)
        self.qkv_weight = self.qkv_bias = None  # set by fuse()

    def fuse(self) -> None:
        self.qkv_weight, self.qkv_bias = fuse_linears(self.q_proj, self.k_proj, self.v_proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        heads = lambda y: y.reshape(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # noqa: E731
        if self.qkv_weight is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = F.linear(x, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class SiglipMLP(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.depth))


class SiglipVisionTower(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def fuse(self) -> None:
        for layer in self.encoder.layers:
            layer.self_attn.fuse()

    def forward(self, pixels: torch.Tensor, compute_dtype: torch.dtype, run_layer=None) -> torch.Tensor:
        """pixels [N, 3, H, W] -> [N, T, width] in `compute_dtype`. `run_layer(layer, x)`: how each encoder
        layer runs (default: called)."""
        x = self.embeddings(pixels).to(compute_dtype)
        for layer in self.encoder.layers:
            x = run_layer(layer, x) if run_layer is not None else layer(x)
        return self.post_layernorm(x)
