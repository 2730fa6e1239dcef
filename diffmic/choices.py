"""The config's closed vocabularies (what each key may name) and the rule that sizes the DCG's local stream.

They live here, free of torch, because the command lines check a config against them before anything heavy is
imported: a typo costs a user a fraction of a second, not the seconds of importing torch. The modules that implement
each choice import their names from here.
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("diffmic", "diffmic_v2")  # model.kind: DiffMIC (v1) or DiffMIC-v2 (diffmic/models/build.py)

# diffusion.schedule: the official code's schedules (diffmic/diffusion.py). jsd's last β is 1: ᾱ = 0 at t = T and the
# first reverse step divides by it (NaN). Kept for parity, never run.
SCHEDULES = ("linear", "const", "quad", "jsd", "sigmoid", "cosine", "cosine_reverse", "cosine_anneal")
USABLE_SCHEDULES = tuple(s for s in SCHEDULES if s != "jsd")
# diffusion.sampler. "dcg" runs no chain: the read-out is the DCG's fused prior alone (zero denoiser calls), the
# control point every search measures beside the chains so that the diffusion head's gain over its own guidance is
# always on the table.
SAMPLERS = ("official", "ddpm", "ddim", "dcg")

# model.denoiser.output: what the denoiser's last layer means, for both models (diffmic/models/diffmic.py)
OUTPUTS = ("eps", "residual")
# DiffMIC-v2's guidance map from the DCG's logits or probabilities, and its chain's start (diffmic_v2.py)
GUIDANCE = ("logits", "probs")
STARTS = ("uniform", "gaussian")

# The two networks that may start from a weights file or the hub (model.<stream>.pretrained / .weights)
STREAMS = ("dcg", "denoiser")

# The DCG's local stream (diffmic/models/dcg.py)
ROI_MODES = ("distinct", "official")
OUTPUT_STRIDES = (32, 16, 8)  # what timm's ResNets offer (dilation below 32)
MIN_GRID = 3  # an automatic stride keeps at least a 3x3 CAM: 9 crop positions, room for every K the search tries


@dataclass(frozen=True)
class CamGeometry:
    stride: int      # backbone output stride
    grid: int        # CAM side, image_size / stride rounded up (timm's ResNets pad)
    crop_size: int   # crop side in pixels
    window: int      # crop side in CAM cells
    positions: int   # distinct upper-left crop cells on the CAM


def cam_geometry(image_size: int, output_stride: int | None = None, crop_size: int | None = None,
                 grid: int | None = None) -> CamGeometry:
    """The one rule that sizes the local stream (config checks and the model both use it).

    output_stride null: 32, the paper's (7x7 CAM at 224 px), unless the image is too small for a 3x3 CAM; then the
    largest of 16, 8 that gives one. crop_size null: one CAM cell, image_size / grid (the paper's 32 px at 224).
    `grid` is the CAM side the built backbone really has, when known.
    """
    stride = output_stride or next((s for s in OUTPUT_STRIDES if -(-image_size // s) >= MIN_GRID), OUTPUT_STRIDES[-1])
    grid = grid or max(1, -(-image_size // stride))
    crop = crop_size or max(1, round(image_size / grid))
    window = max(1, round(crop * grid / image_size))
    return CamGeometry(stride, grid, crop, window, max(1, grid - window + 1) ** 2)
