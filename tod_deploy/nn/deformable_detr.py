"""Deformable-DETR (single-scale queries, no box refinement, not two-stage), upstream key names.

Module and parameter names follow fundamentalvision/Deformable-DETR (which ThumbDet forks):
``transformer.encoder.layers.0.self_attn.sampling_offsets.weight``,
``transformer.decoder.layers.0.cross_attn.*``, ``input_proj.0.0.weight``, ``class_embed.0.*``,
``bbox_embed.0.layers.0.*``, ``query_embed.weight``, ``transformer.reference_points.*``,
``transformer.level_embed``; so upstream checkpoints load as they are.

Inputs here are unpadded (one fixed size per batch), so the padding mask is empty and every
valid ratio is 1; spatial shapes are Python ints at export time, which lets the exporter fold
position embeddings and reference points into constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tod_deploy.nn.ops import inverse_sigmoid, ms_deform_attn


@dataclass(frozen=True)
class DeformableDETRConfig:
    num_classes: int = 91
    num_queries: int = 300
    hidden_dim: int = 256
    nheads: int = 8
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    num_feature_levels: int = 4
    n_points: int = 4
    dropout: float = 0.1


def sine_position_embedding(n: int, h: int, w: int, num_pos_feats: int, device: torch.device) -> Tensor:
    """DETR's normalised sine embedding for an unpadded map: [n, 2 * num_pos_feats, h, w]."""
    eps, scale, temperature = 1e-6, 2 * math.pi, 10000
    y_embed = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y_embed = (y_embed - 0.5) / (h + eps) * scale
    x_embed = (x_embed - 0.5) / (w + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[:, None] / dim_t  # [w, F]
    pos_y = y_embed[:, None] / dim_t  # [h, F]
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        (pos_y[:, None, :].expand(h, w, num_pos_feats), pos_x[None, :, :].expand(h, w, num_pos_feats)), dim=2
    )
    return pos.permute(2, 0, 1).unsqueeze(0).expand(n, -1, -1, -1)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Zhu et al.), 2-d reference points only."""

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Upstream's init: offsets start on a ring of directions, one per head, growing per point.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self, query: Tensor, reference_points: Tensor, value_in: Tensor, spatial_shapes: list[tuple[int, int]]
    ) -> Tensor:
        n, lq, _ = query.shape
        heads, levels, points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).view(n, value_in.shape[1], heads, -1)
        weights = self.attention_weights(query).view(n, lq, heads, levels * points)
        weights = F.softmax(weights, -1).view(n, lq, heads, levels, points)
        # Upstream: locations = reference + offsets / (W, H) of the level, and grid_sample's grid = 2 * locations
        # - 1. The offsets' share, 2 / (W, H), scales the projection's columns instead, so the exported graph
        # runs one Add on the [N, Lq, M, L, P, 2] samples, not a broadcast Div, Mul and Sub (onnxruntime, ThumbDet
        # 4x at 512x512, 2 threads: those Divs alone took 3.8 of 58.6 ms).
        normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
        column_scale = (2.0 / normalizer)[None, :, None, :].expand(heads, levels, points, 2).reshape(-1)
        offsets = F.linear(query, self.sampling_offsets.weight * column_scale[:, None],
                           self.sampling_offsets.bias * column_scale)  # fmt: skip
        # The reference points are tiled over the points of a head first, so the Add broadcasts whole heads'
        # blocks of levels * points * 2 values; broadcast straight onto the [N, Lq, M, L, P, 2] offsets,
        # onnxruntime adds 2 values per step (ThumbDet 4x decoder layer, 2 threads: 0.30 -> 0.05 ms, measured).
        block = (2 * reference_points - 1)[:, :, :, None, :].expand(n, lq, levels, points, 2)
        grids = offsets.view(n, lq, heads, -1) + block.reshape(n, lq, 1, -1)
        grids = grids.view(n, lq, heads, levels, points, 2)
        return self.output_proj(ms_deform_attn(value, spatial_shapes, grids, weights))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.self_attn = MSDeformAttn(d, cfg.num_feature_levels, cfg.nheads, cfg.n_points)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cross_attn = MSDeformAttn(d, cfg.num_feature_levels, cfg.nheads, cfg.n_points)
        self.dropout1 = nn.Dropout(cfg.dropout)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.nheads, dropout=cfg.dropout)
        self.dropout2 = nn.Dropout(cfg.dropout)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, cfg.dim_feedforward)
        self.dropout3 = nn.Dropout(cfg.dropout)
        self.linear2 = nn.Linear(cfg.dim_feedforward, d)
        self.dropout4 = nn.Dropout(cfg.dropout)
        self.norm3 = nn.LayerNorm(d)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        shapes: list[tuple[int, int]],
    ) -> Tensor:
        q = k = (tgt + query_pos).transpose(0, 1)
        attn = self.self_attn(q, k, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attn))
        tgt = self.norm1(tgt + self.dropout1(self.cross_attn(tgt + query_pos, reference_points, memory, shapes)))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class Encoder(nn.Module):
    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))


class Decoder(nn.Module):
    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))


def encoder_reference_points(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Pixel centres of every level, normalised: [sum HW, 2] as (x, y)."""
    refs = []
    for h, w in shapes:
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device) / h,
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device) / w,
            indexing="ij",
        )
        refs.append(torch.stack((ref_x.reshape(-1), ref_y.reshape(-1)), -1))
    return torch.cat(refs, 0)


class DeformableTransformer(nn.Module):
    def __init__(self, cfg: DeformableDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.level_embed = nn.Parameter(torch.empty(cfg.num_feature_levels, cfg.hidden_dim))
        self.reference_points = nn.Linear(cfg.hidden_dim, 2)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
        nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], query_embed: Tensor) -> tuple[list[Tensor], Tensor]:
        """Returns the decoder state after every layer and the (sigmoid) reference points."""
        n = srcs[0].shape[0]
        shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        flat, pos_flat = [], []
        for lvl, src in enumerate(srcs):
            h, w = shapes[lvl]
            pos = sine_position_embedding(n, h, w, self.cfg.hidden_dim // 2, src.device)
            flat.append(src.flatten(2).transpose(1, 2))
            pos_flat.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        memory = torch.cat(flat, 1)
        pos = torch.cat(pos_flat, 1)
        levels = self.cfg.num_feature_levels
        enc_ref = encoder_reference_points(shapes, memory.device)[None, :, None, :].expand(n, -1, levels, -1)
        for layer in self.encoder.layers:
            memory = layer(memory, pos, enc_ref, shapes)

        query_pos, tgt = torch.split(query_embed, self.cfg.hidden_dim, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(n, -1, -1)
        tgt = tgt.unsqueeze(0).expand(n, -1, -1)
        reference = self.reference_points(query_pos).sigmoid()
        dec_ref = reference[:, :, None].expand(-1, -1, levels, -1)
        states = []
        for layer in self.decoder.layers:
            tgt = layer(tgt, query_pos, dec_ref, memory, shapes)
            states.append(tgt)
        return states, reference


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [output_dim], strict=True))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def input_projections(in_channels: list[int], cfg: DeformableDETRConfig) -> nn.ModuleList:
    """1x1 conv + GN per backbone level, then 3x3/2 convs on the last map for the extra levels."""
    d = cfg.hidden_dim
    projs = [nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(32, d)) for c in in_channels]
    last = in_channels[-1]
    for _ in range(cfg.num_feature_levels - len(in_channels)):
        projs.append(nn.Sequential(nn.Conv2d(last, d, kernel_size=3, stride=2, padding=1), nn.GroupNorm(32, d)))
        last = d
    for proj in projs:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.constant_(proj[0].bias, 0)
    return nn.ModuleList(projs)


class DeformableDETR(nn.Module):
    """Deformable-DETR around any backbone that returns ``(features, image_size)``.

    Upstream repeats the *same* heads once per decoder layer (``class_embed.0`` ...
    ``class_embed.5`` alias one Linear); the aliasing is kept so checkpoint keys match.
    The backbone sits at ``backbone.0`` as upstream's ``Joiner`` puts it.
    """

    def __init__(self, backbone: nn.Module, in_channels: list[int], cfg: DeformableDETRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = nn.ModuleList([backbone])
        self.transformer = DeformableTransformer(cfg)
        self.input_proj = input_projections(in_channels, cfg)
        class_embed = nn.Linear(cfg.hidden_dim, cfg.num_classes)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        bbox_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, 4, 3)
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        self.class_embed = nn.ModuleList([class_embed] * cfg.dec_layers)
        self.bbox_embed = nn.ModuleList([bbox_embed] * cfg.dec_layers)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim * 2)

    def levels(self, features: list[Tensor]) -> list[Tensor]:
        """Project backbone maps to d_model; extra levels come from the last raw map."""
        srcs = [proj(f) for proj, f in zip(self.input_proj, features, strict=False)]
        last = features[-1]
        for proj in self.input_proj[len(features) :]:
            last = proj(last)
            srcs.append(last)
        return srcs

    def forward(self, images01: Tensor, all_layers: bool = False) -> dict[str, object]:
        """images01: RGB in [0, 1]. Returns logits / cxcywh boxes (last layer, or all layers)."""
        features = self.backbone[0](images01)
        states, reference = self.transformer(self.levels(features), self.query_embed.weight)
        layers = range(len(states)) if all_layers else [len(states) - 1]
        ref_logit = inverse_sigmoid(reference)
        preds = []
        for i in layers:
            logits = self.class_embed[i](states[i])
            delta = self.bbox_embed[i](states[i])
            boxes = torch.cat([(delta[..., :2] + ref_logit).sigmoid(), delta[..., 2:].sigmoid()], -1)
            preds.append((logits, boxes))
        return {"pred_logits": preds[-1][0], "pred_boxes": preds[-1][1], "layers": preds, "features": features}
