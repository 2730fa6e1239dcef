"""DiffMIC: dual-guidance diffusion for medical image classification (Yang et al., MICCAI 2023).

The core package needs only torch, timm, numpy, PIL and scikit-learn: it trains from a plain config dict, evaluates,
loads bundles and predicts from local files without Ray, Hydra or boto3, and imports nothing from `tune/`, which
plugs in through the entry points of diffmic.remote (S3 inputs, Ray Train). Its command lines compose their config
with Hydra. A process that imports timm beside a CPU-only torch calls diffmic.compat.ensure_torchvision_importable()
first, or imports it through diffmic.compat.import_timm() (the core does).
"""
__version__ = "0.1.0"
