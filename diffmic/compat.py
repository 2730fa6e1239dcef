"""Make `import torchvision` / `import timm` work beside a CPU-only torch.

The registry's torchvision 0.28 is a CUDA build. Next to CPU torch its C++ library cannot load, and its Python side
then fails at import while registering fake kernels for `torchvision::nms` (the op schema does not exist). Defining
the two schemas it touches is enough for everything this project uses (timm backbones); torchvision's C++ ops stay
unavailable, which is why ROI cropping is plain torch. Where torchvision's library loads (a matching CUDA install),
this does nothing.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_FRAGMENT: torch.library.Library | None = None  # kept alive for the process: dropping it unregisters the schemas
_CHECKED = False


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to fix
    for lib in Path(spec.origin).parent.glob("_C*.so"):
        try:
            torch.ops.load_library(str(lib))
            return True
        except (OSError, RuntimeError):
            return False
    return False


def ensure_torchvision_importable() -> None:
    global _FRAGMENT, _CHECKED
    if _CHECKED:
        return
    _CHECKED = True
    if _torchvision_ops_load():
        return
    _FRAGMENT = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _FRAGMENT.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_timm():
    """timm, with the fix above applied first: every use of timm in the core goes through here, so a command line
    needs neither torch nor timm until it builds a model (bad input stops before either is imported)."""
    ensure_torchvision_importable()
    import timm
    return timm
