"""DCG, the dual-granularity conditional guidance network (a simplified GMIC).

Global stream: backbone feature map → 1×1 conv class-activation map (CAM) → top-t% spatial aggregation = global
prior. Local stream: the K most salient CAM cells → crops of the input image → second backbone → gated-attention
pooling = local prior. The fused prior averages the two logit vectors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffmic.choices import ROI_MODES, cam_geometry
from diffmic.models.backbone import create_backbone

@dataclass
class DCGOutput:
    fused: torch.Tensor   # N×C logits
    global_: torch.Tensor
    local: torch.Tensor
    cam: torch.Tensor     # N×C×G×G saliency (raw logits, no sigmoid)
    rois: torch.Tensor    # N×K×2 upper-left pixel (row, col) of each crop


def top_t_aggregate(cam: torch.Tensor, top_t: float) -> torch.Tensor:
    """Per class, the mean of the top ⌈t·G²⌉ CAM values (t = 1 is global average pooling)."""
    flat = cam.flatten(2)
    k = max(1, math.ceil(top_t * flat.shape[-1]))
    return flat.mean(-1) if k == flat.shape[-1] else flat.topk(k, dim=-1).values.mean(-1)


def select_rois(cam: torch.Tensor, roi_count: int, window: int = 1, mode: str = "distinct") -> torch.Tensor:
    """Upper-left CAM cells (N×K×2, row/col) of the K most salient window positions.

    Each class channel is min-max normalised per image and the channels are summed; a window's score is its mean.
    `official` repeats the official greedy loop exactly (argmax, then zero the picked cells), flaws included: a
    constant channel makes the map NaN and every pick cell 0, and once the positive cells run out, picks repeat.
    `distinct` (default) guards the constant case and returns K distinct positions (ties → row-major order).
    """
    if mode not in ROI_MODES:
        raise ValueError(f"model.dcg.roi_mode={mode!r}: expected one of {', '.join(ROI_MODES)}")
    lo = cam.amin(dim=(2, 3), keepdim=True)
    span = cam.amax(dim=(2, 3), keepdim=True) - lo
    if mode == "distinct":
        span = span.clamp_min(torch.finfo(cam.dtype).tiny)
    saliency = ((cam - lo) / span).sum(1, keepdim=True)  # N×1×G×G
    grid = cam.shape[-1]
    positions = grid - window + 1
    if roi_count > positions * positions:
        raise ValueError(f"model.dcg.roi_count={roi_count}: expected at most {positions * positions} "
                         f"(the {positions}x{positions} crop positions on the {grid}x{grid} CAM)")
    if mode == "distinct":
        score = F.avg_pool2d(saliency, window, stride=1).flatten(1)
        index = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :roi_count]
    else:
        picks = []
        for _ in range(roi_count):
            score = F.avg_pool2d(saliency, window, stride=1).flatten(1)
            idx = score.argmax(1)
            picks.append(idx)
            r, c = idx // positions, idx % positions
            mask = torch.ones_like(saliency)
            for n in range(cam.shape[0]):
                mask[n, :, r[n]:r[n] + window, c[n]:c[n] + window] = 0
            saliency = saliency * mask
        index = torch.stack(picks, 1)
    return torch.stack([index // positions, index % positions], -1)


def cells_to_pixels(cells: torch.Tensor, grid: int, image_size: int, crop_size: int) -> torch.Tensor:
    """round(cell / G · H), kept inside the image so a crop never runs off its edge."""
    pixels = torch.round(cells.double() / grid * image_size).long()
    return pixels.clamp(0, image_size - crop_size)


def crop_rois(images: torch.Tensor, upper_left: torch.Tensor, crop_size: int) -> torch.Tensor:
    """N×K×C×s×s crops at the given upper-left pixels, cut with one gather (no Python loop over N×K)."""
    n, k = upper_left.shape[:2]
    offsets = torch.arange(crop_size, device=images.device)
    rows = (upper_left[..., 0, None] + offsets).view(n, k, crop_size, 1)
    cols = (upper_left[..., 1, None] + offsets).view(n, k, 1, crop_size)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 1, 4, 2, 3)


class GatedAttentionPool(nn.Module):
    """Ilse et al. (2018): α = softmax_k w·[σ(U h_k) ⊙ tanh(V h_k)], z = Σ α_k h_k."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.u = nn.Linear(dim, hidden, bias=False)
        self.v = nn.Linear(dim, hidden, bias=False)
        self.w = nn.Linear(hidden, 1, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        alpha = torch.softmax(self.w(torch.sigmoid(self.u(h)) * torch.tanh(self.v(h))), dim=1)
        return (alpha * h).sum(1)


class DCG(nn.Module):
    # Every knob is given (configs/model/diffmic.yaml holds their defaults, build_model passes them): no second
    # default here that could disagree with the YAML.
    def __init__(self, num_classes: int, image_size: int, *, backbone: str, local_backbone: str | None,
                 pretrained: bool, weights: str | None, output_stride: int | None, roi_count: int,
                 crop_size: int | None, top_t: float, roi_mode: str, crop_channels: str, fusion_weight: float,
                 attention_dim: int = 128):
        super().__init__()
        # Values are checked once, on the config (diffmic.config.validate_config); only the grid measured on the
        # backbone below can add a constraint of its own.
        geometry = cam_geometry(image_size, output_stride, crop_size)
        self.image_size, self.roi_count = image_size, roi_count
        self.top_t, self.roi_mode, self.crop_channels = top_t, roi_mode, crop_channels
        self.fusion_weight = fusion_weight
        self.global_net = create_backbone(backbone, pooled=False, pretrained=pretrained, weights=weights,
                                          output_stride=geometry.stride)
        self.local_net = create_backbone(local_backbone or backbone, pooled=True, pretrained=pretrained,
                                         weights=weights)
        self.saliency = nn.Conv2d(self.global_net.num_features, num_classes, 1, bias=False)
        self.attention = GatedAttentionPool(self.local_net.num_features, attention_dim)
        self.local_head = nn.Linear(self.local_net.num_features, num_classes, bias=False)
        with torch.no_grad():
            was_training = self.global_net.training
            self.global_net.eval()
            self.grid = self.global_net(torch.zeros(1, 3, image_size, image_size)).shape[-1]
            self.global_net.train(was_training)
        geometry = cam_geometry(image_size, geometry.stride, crop_size, grid=self.grid)
        self.crop_size, self.window = geometry.crop_size, geometry.window
        if roi_count > geometry.positions:
            raise ValueError(f"model.dcg.roi_count={roi_count}: expected at most {geometry.positions} (crop positions "
                             f"on the {self.grid}x{self.grid} CAM for crop_size={self.crop_size} at {image_size} px)")

    def forward(self, x: torch.Tensor) -> DCGOutput:
        cam = self.saliency(self.global_net(x))
        y_global = top_t_aggregate(cam, self.top_t)
        with torch.no_grad():
            cells = select_rois(cam.detach().float(), self.roi_count, self.window, self.roi_mode)
            rois = cells_to_pixels(cells, self.grid, self.image_size, self.crop_size)
        crops = crop_rois(x, rois, self.crop_size)
        if self.crop_channels == "red":  # the official crops: normalised red channel, repeated to 3 channels
            crops = crops[:, :, :1].expand(-1, -1, 3, -1, -1)
        n, k = crops.shape[:2]
        h = self.local_net(crops.reshape(n * k, *crops.shape[2:]).contiguous()).view(n, k, -1)
        y_local = self.local_head(self.attention(h))
        fused = self.fusion_weight * y_global + (1 - self.fusion_weight) * y_local
        return DCGOutput(fused=fused, global_=y_global, local=y_local, cam=cam, rois=rois)
