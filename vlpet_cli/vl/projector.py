"""The visual projector (spec modules §3) and the 7x7 -> 6x6 grid pooling (spec pipeline §2.2)."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn
from torch.nn import functional as F


def _norm(family: str, d: int, eps: float) -> nn.Module:
    if family == "t5":
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        return T5LayerNorm(d, eps=eps)
    return nn.LayerNorm(d)


class VisualProjector(nn.Module):
    """v_i = LN(W_f f_i) + LN(W_p box_i) + E_img[img_i] + E_word[V-1-obj_i] (boxes are zeros for CLIP grids)."""

    def __init__(self, feat_dim: int, d: int, family: str, eps: float = 1e-6):
        super().__init__()
        self.feat_embedding = nn.Sequential(nn.Linear(feat_dim, d), _norm(family, d, eps))
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(5, d), _norm(family, d, eps))
        self.img_order_embedding = nn.Embedding(2, d)
        if family == "bart":
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, 0.0, 0.02)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(cast(torch.Tensor, module.bias))

    def forward(self, feats: torch.Tensor, img_ids: torch.Tensor, obj_ids: torch.Tensor,
                word_embedding: torch.Tensor) -> torch.Tensor:
        """feats [B, N, feat_dim]; img_ids, obj_ids [N]; word_embedding [V, d] (the shared, frozen table)."""
        boxes = feats.new_zeros(*feats.shape[:2], 5)
        obj = word_embedding[word_embedding.shape[0] - 1 - obj_ids]
        return (self.feat_embedding(feats) + self.absolute_vis_pos_embedding(boxes)
                + self.img_order_embedding(img_ids) + obj)


def pool_grid(feats: torch.Tensor, n_boxes: int) -> torch.Tensor:
    """[B, n_img, L, D] grid tokens -> [B, n_img, s*s, D] by adaptive max pooling, s = floor(sqrt(n_boxes))."""
    b, n_img, length, dim = feats.shape
    side = math.isqrt(length)
    if side * side != length:
        raise ValueError(f"visual features have {length} tokens per image, which is not a square grid")
    s = math.isqrt(n_boxes)
    if s == side:
        return feats
    grid = feats.reshape(b * n_img, side, side, dim).permute(0, 3, 1, 2)
    pooled = F.adaptive_max_pool2d(grid, (s, s))
    return pooled.permute(0, 2, 3, 1).reshape(b, n_img, s * s, dim)


def visual_ids(n_img: int, per_image: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image-order ids (0/1 per image) and object-order ids (0..per_image-1 per image)."""
    img = torch.arange(n_img, device=device).repeat_interleave(per_image)
    obj = torch.arange(per_image, device=device).repeat(n_img)
    return img, obj
