"""Shared test helpers: compose the real Hydra configs with overrides."""
from __future__ import annotations

from diffmic.cli import CONFIG_DIR

# Set for every process the tests start, Ray's included. Ray Train's controller polls its workers every 2 s (Ray's
# default), and a finished run waited ~6 s to be noticed: a 1-trial search took 42.4 s, 36.1 s with 0.25 s. The suite
# runs dozens of Ray Train runs of seconds each; a run of hours does not care.
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}

# A run that takes seconds: 48 px (a 3x3 CAM, room for K <= 9) synthetic images, tiny splits, one epoch, and timm's
# `test_resnet` backbones (~0.5 M parameters each), so that a checkpoint is a few MB, not ~600 MB: a full test session
# then writes well under a GB.
TINY = [
    "model.dcg.backbone=test_resnet", "model.denoiser.encoder=test_resnet", "dataset.image_size=48", "dataset.num_train=96", "dataset.num_test=32", "model.dcg.roi_count=2",
    "model.denoiser.feature_dim=32", "diffusion.timesteps=50", "diffusion.sample_steps=5", "train.epochs=1",
    "train.dcg_pretrain_epochs=1", "train.batch_size=16", "train.eval_batch_size=64",
]


def merged(base: list[str], *changes: str) -> list[str]:
    """`base` overrides with `changes`' keys over them: one value per key, as on a user's command line."""
    keyed = dict(o.split("=", 1) for o in (*base, *changes))
    return [f"{k}={v}" for k, v in keyed.items()]


def compose(overrides: list[str] = (), config_name: str = "config") -> dict:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def dcg_knobs(**given) -> dict:
    """DCG's keyword arguments: configs/model/diffmic.yaml's `dcg` (the one place its defaults live) without the hub,
    with `given` over them."""
    import yaml
    knobs = yaml.safe_load((CONFIG_DIR / "model" / "diffmic.yaml").read_text())["dcg"]
    return {**knobs, "pretrained": False, **given}
