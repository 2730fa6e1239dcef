"""DiffMIC: dual-guidance diffusion for medical image classification (Yang et al., MICCAI 2023).

The core package needs only torch, timm, numpy and scikit-learn; Ray, Hydra and boto3 live in the entry points
and in `tune/`.
"""
from diffmic._compat import ensure_torchvision_importable

ensure_torchvision_importable()

__version__ = "0.1.0"
