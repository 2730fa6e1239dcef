"""Backbones come from timm by name; no ResNet is copied into this repo.

timm is imported when a backbone is made, not when this module is: timm imports torchvision, and beside a CPU-only
torch that needs diffmic.compat's fix, which each process applies where it starts.
"""
from __future__ import annotations

from torch import nn

from diffmic.weights import hub_model, load_weights_file


def check_weights_fit(model_cfg: dict) -> None:
    """Before any data is read: each stream's local weights file fits its backbone (one line naming the first
    mismatch), so that a wrong file is found before, not after, the images."""
    for stream, key in (("dcg", "backbone"), ("denoiser", "encoder")):
        c = model_cfg[stream]
        weights = c.get("weights")
        if weights and not str(weights).startswith("s3://"):
            create_backbone(c[key], pooled=True, weights=weights, stream=stream)


def create_backbone(name: str, *, pooled: bool, pretrained: bool = False, weights: str | None = None,
                    output_stride: int = 32, stream: str = "dcg") -> nn.Module:
    """A timm model without its classifier: `pooled` returns (N, F) features, otherwise the (N, F, h, w) map.

    `weights` is a local file with the backbone's ImageNet (or other) weights, for machines without hub access;
    classifier keys in it are ignored; without it `pretrained` takes timm's hub weights of `name` (a tag such as
    `resnet50.tv_in1k` picks which). `num_features` is set on the returned module either way.
    """
    kwargs = {"num_classes": 0, "global_pool": "avg" if pooled else ""}
    if output_stride != 32:
        kwargs["output_stride"] = output_stride
    if pretrained and not weights:
        return hub_model(name, stream, **kwargs)
    from diffmic.compat import import_timm
    timm = import_timm()

    try:
        model = timm.create_model(name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm raises RuntimeError for unknown names
        raise ValueError(f"backbone {name!r}: {e}") from None
    if weights:
        try:
            missing, _ = model.load_state_dict(load_weights_file(weights), strict=False)
        except RuntimeError as e:  # same key names, other shapes: another architecture's (or width's) weights
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e))[:200]
            raise ValueError(f"backbone weights {weights!r} do not fit {name!r} ({first})") from None
        if missing:
            raise ValueError(f"backbone weights {weights!r} do not fit {name!r}: {len(missing)} missing keys, "
                             f"e.g. {missing[0]!r}")
    return model
