"""Where a backbone's initial weights come from: the model hub (timm, where the machine can reach it) or a weights
file (`model.dcg.weights`, local here; `tune/` fetches s3:// files into the node's cache first).

The paper starts both DCG streams from torchvision's ImageNet-1k ResNet-50 (timm `resnet50.tv_in1k`). A run that asks
for pretrained weights and cannot get them stops with one line saying how to supply them: never a silent random start.
"""
from __future__ import annotations

from pathlib import Path

import torch

from diffmic.choices import STREAMS
from diffmic.errors import DiffmicError

PAPER_DCG_BACKBONE = "resnet50.tv_in1k"


class WeightsError(DiffmicError, ValueError):
    """Pretrained weights that cannot be had; one line naming the key and how to supply them."""


def how_to_supply(stream: str, name: str) -> str:
    return (f"model.{stream}.pretrained=true needs the pretrained weights of {name!r}, which cannot be fetched from "
            f"the model hub here; give a weights file with model.{stream}.weights=PATH|s3://… (on a machine with hub "
            f"access `python -m tune.weights fetch {name} --to DIR|s3://…` writes one), or train from scratch with "
            f"model.{stream}.pretrained=false")


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors or .pt/.pth file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"backbone weights {str(path)!r}: file not found (expected a local .safetensors or .pth)")
    import warnings
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        with warnings.catch_warnings():  # torch's own warning about the file would come before our one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, not a weights file, or a pickle holding objects (never unpickled)
        raise WeightsError(f"backbone weights {str(path)!r} cannot be read ({type(e).__name__}: "
                           f"{' '.join(str(e).split())[:120]}); expected a .safetensors file or a .pth holding a "
                           "state dict of tensors") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"backbone weights {str(path)!r}: expected a state dict of tensors, found "
                           f"{type(state).__name__}")
    return state


def hub_model(name: str, stream: str = "dcg", **kwargs) -> torch.nn.Module:
    """timm's model `name` with its hub weights (downloaded once into the hub cache), or WeightsError."""
    from diffmic.compat import import_timm
    timm = import_timm()
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as e:  # timm's word for an unknown model name
        raise ValueError(f"backbone {name!r}: {e}") from None
    except Exception as e:  # the hub's errors (offline, unreachable, no such file) share no base class here
        raise WeightsError(f"{how_to_supply(stream, name)} ({type(e).__name__})") from None


def check_pretrained(model_cfg: dict) -> None:
    """Before any data or training: each stream that asks for pretrained weights can get them on this machine."""
    for stream in STREAMS:
        c = model_cfg[stream]
        name = c["backbone"] if stream == "dcg" else c["encoder"]
        weights = c.get("weights")
        if weights and not str(weights).startswith("s3://"):
            load_weights_file(weights)  # exists and reads (s3:// files are checked where they are fetched)
        elif c.get("pretrained") and not weights:
            hub_model(name, stream, num_classes=0)


def write_hub_weights(name: str, path: str | Path) -> Path:
    """Save `name`'s hub weights (no classifier) as a safetensors file for machines without hub access."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in hub_model(name, num_classes=0).state_dict().items()}
    save_file(state, str(path))
    return path
