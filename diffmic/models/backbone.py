"""Backbones come from timm by name; no ResNet is copied into this repo."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors or .pt/.pth file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {str(path)!r}: file not found (expected a local .safetensors or .pth)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def create_backbone(name: str, *, pooled: bool, pretrained: bool = False, weights: str | None = None,
                    output_stride: int = 32) -> nn.Module:
    """A timm model without its classifier: `pooled` returns (N, F) features, otherwise the (N, F, h, w) map.

    `weights` is a local file with the backbone's ImageNet (or other) weights, for machines without hub access;
    classifier keys in it are ignored. `num_features` is set on the returned module either way.
    """
    kwargs = {"output_stride": output_stride} if output_stride != 32 else {}
    try:
        model = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0,
                                  global_pool="avg" if pooled else "", **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ValueError(f"backbone {name!r}: {e}") from None
    if weights:
        missing, _ = model.load_state_dict(load_weights_file(weights), strict=False)
        if missing:
            raise ValueError(f"backbone weights {weights!r} do not fit {name!r}: {len(missing)} missing keys, "
                             f"e.g. {missing[0]!r}")
    return model
