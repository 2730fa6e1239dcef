"""Checks on a resolved config (a plain dict) that catch impossible values before any data is read or any
cluster work starts. Each problem is one line naming the key, the value and what is expected."""
from __future__ import annotations

import copy
import difflib
import re

from diffmic.choices import (GUIDANCE, KINDS, OUTPUT_STRIDES, OUTPUTS, ROI_MODES, SAMPLERS, STARTS, USABLE_SCHEDULES,
                             cam_geometry)
from diffmic.errors import DiffmicError
from diffmic.metrics import SCALAR_METRICS


class ConfigError(DiffmicError, ValueError):
    pass


def _get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{dotted}: missing from the config")
        node = node[part]
    return node


def with_values(cfg: dict, values: dict) -> dict:
    """A copy of `cfg` with dotted keys set (what an override `key=value` does); each key must exist (a typo is an
    error naming the nearest key, never a silently added one)."""
    out = copy.deepcopy(cfg)
    if "model.kind" in values and values["model.kind"] != out["model"]["kind"]:
        # another model (a search over both): the keys it has and this config lacks come from its own YAML
        from diffmic.defaults import complete
        out["model"]["kind"] = values["model.kind"]
        out = complete(out)
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            near = difflib.get_close_matches(key, list(dotted_keys(cfg)), n=1)
            raise ConfigError(f"{key}={value!r}: no such key in the config" + (f"; did you mean {near[0]}?" if near
                                                                                else ""))
        node[leaf] = value
    return out


def dotted_keys(node: dict, prefix: str = ""):
    for k, v in node.items():
        yield f"{prefix}{k}"
        if isinstance(v, dict):
            yield from dotted_keys(v, f"{prefix}{k}.")


def parse_overrides(items: list[str]) -> dict:
    """`key=value` strings as {dotted key: value}, each value read as YAML (1e-3, true, null, [a, b])."""
    import yaml

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: expected key=value")
        out[key.lstrip("+")] = yaml.safe_load(text) if text else ""
    return out


def _check(cfg: dict, key: str, ok, expected: str) -> None:
    value = _get(cfg, key)
    try:
        good = ok(value)
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# Keys the code reads without a check of their value below. The defaults live in configs/ only: code reads what it is
# given, and a key missing from a hand-made or old config is named here, not replaced by a second default.
READ_AS_IS = ("seed", "deterministic", "dataset.split_seed", "train.min_lr", "train.joint_dcg",
              "train.dcg_amsgrad", "train.denoiser", "train.channels_last", "train.ema", "train.checkpoint_every", "train.test_at_end",
              "train.amp", "train.grad_clip", "model.denoiser.embedding_bias")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(key: str, value) -> None:
    """A name that becomes one path component under a storage root (experiment): never a path of its own."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(f"{key}={value!r}: expected a name of letters, digits, '-', '_' and '.' (not starting with "
                          "'.' or '-', at most 128 characters)")


def split_seed(cfg: dict) -> int:
    """The seed of the train/val/test split: dataset.split_seed, or the run's seed when that is null."""
    given = cfg["dataset"]["split_seed"]
    return int(cfg["seed"] if given is None else given)


# Sizes beyond any real model (the paper: 6144 and 1000): a config asking for more is a mistake or a hostile
# bundle, refused before a model of that size is allocated.
MAX_FEATURE_DIM, MAX_TIMESTEPS = 65536, 100_000


def check_architecture(cfg: dict) -> None:
    """The values that size the model, checked before it is built (training configs and read-back bundles)."""
    c = lambda key, ok, expected: _check(cfg, key, ok, expected)  # noqa: E731
    c("model.denoiser.feature_dim", lambda v: _int(v) and 1 <= v <= MAX_FEATURE_DIM,
      f"an integer in 1..{MAX_FEATURE_DIM}")
    c("diffusion.timesteps", lambda v: _int(v) and 2 <= v <= MAX_TIMESTEPS, f"an integer in 2..{MAX_TIMESTEPS}")
    c("model.dcg.roi_count", lambda v: _int(v) and 1 <= v <= 1024, "an integer in 1..1024")


def validate_config(cfg: dict) -> None:
    for key in READ_AS_IS:
        _get(cfg, key)
    check_name("experiment", _get(cfg, "experiment"))
    c = lambda key, ok, expected: _check(cfg, key, ok, expected)  # noqa: E731
    c("train.epochs", lambda v: _int(v) and v >= 1, "an integer >= 1")
    c("train.dcg_pretrain_epochs", lambda v: _int(v) and v >= 0, "an integer >= 0")
    c("train.batch_size", lambda v: _int(v) and v >= 2, "an integer >= 2 (BatchNorm needs two samples)")
    c("train.eval_batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1")
    c("train.lr", lambda v: v > 0, "a positive learning rate")
    c("train.dcg_lr", lambda v: v > 0, "a positive learning rate")
    c("train.warmup_epochs", lambda v: v is None or v >= 0, "null (train.warmup_fraction of the epochs) or a number >= 0")
    c("train.warmup_fraction", lambda v: 0 <= v < 1, "a share of the epochs in [0, 1)")
    c("train.mmd_weight", lambda v: v >= 0, "a weight >= 0 (0 turns the MMD terms off)")
    c("train.ce_weight", lambda v: v >= 0, "a weight >= 0 (0 turns the cross-entropy term off)")
    c("model.denoiser.output", lambda v: v in OUTPUTS, f"one of {', '.join(OUTPUTS)}")
    c("model.kind", lambda v: v in KINDS, f"one of {', '.join(KINDS)} (model=diffmic | model=diffmic_v2)")
    if cfg["model"]["kind"] == "diffmic_v2":  # v2's own knobs (configs/model/diffmic_v2.yaml)
        c("model.denoiser.grid", lambda v: v is None or (_int(v) and 2 <= v <= 64),
          "null (Np = model.dcg.roi_count, as the official code) or an integer in 2..64")
        c("model.denoiser.guidance", lambda v: v in GUIDANCE, f"one of {', '.join(GUIDANCE)}")
        c("model.denoiser.start", lambda v: v in STARTS, f"one of {', '.join(STARTS)}")
        c("model.denoiser.focal_alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
          "a number >= 0 (0: the paper's plain noise MSE)")
        c("model.denoiser.roi_encoder", lambda v: v is None or (isinstance(v, str) and v),
          "null (the same as model.denoiser.encoder) or a timm model name")
    c("train.mmd_bandwidths", lambda v: len(v) > 0 and all(b > 0 for b in v), "a non-empty list of positive numbers")
    c("train.ema_decay", lambda v: 0 <= v < 1, "a value in [0, 1)")
    c("train.val_every", lambda v: _int(v) and v >= 1, "an integer >= 1")
    c("train.num_workers", lambda v: v == "auto" or (_int(v) and v >= 0),
      "auto (one DataLoader worker per CPU of the training process) or an integer >= 0")
    c("train.augment_on", lambda v: v in ("auto", "loader", "device"), "auto, loader or device")
    c("train.select_metric", lambda v: v in SCALAR_METRICS, f"one of {', '.join(SCALAR_METRICS)}")
    c("train.select_mode", lambda v: v in ("max", "min"), "max or min")
    c("train.guidance", lambda v: v in ("eval", "shared"), "eval (official: priors from the DCG in eval mode) or shared")
    c("diffusion.timesteps", lambda v: _int(v) and 2 <= v <= MAX_TIMESTEPS, f"an integer in 2..{MAX_TIMESTEPS}")
    c("diffusion.schedule", lambda v: v in USABLE_SCHEDULES,
      f"one of {', '.join(USABLE_SCHEDULES)}" + (" (jsd ends at alpha_bar = 0, where the reverse chain divides by "
                                                  "zero)" if cfg["diffusion"]["schedule"] == "jsd" else ""))
    c("diffusion.beta_start", lambda v: 0 < v < 1, "a value in (0, 1)")
    c("diffusion.beta_end", lambda v: cfg["diffusion"]["beta_start"] < v < 1, "a value in (beta_start, 1)")
    T = cfg["diffusion"]["timesteps"]
    c("diffusion.beta_steps", lambda v: v is None or (_int(v) and v >= 1 and cfg["diffusion"]["beta_end"] * v / T < 1),
      f"null or an integer >= 1 with beta_end * beta_steps / timesteps < 1 (the rescaled beta_end, "
      f"beta_end={cfg['diffusion']['beta_end']}, timesteps={T})")
    c("diffusion.sampler", lambda v: v in SAMPLERS, f"one of {', '.join(SAMPLERS)}")
    if cfg["diffusion"]["sampler"] == "official" and cfg["diffusion"]["beta_steps"]:
        ref = cfg["diffusion"]["beta_steps"]  # the official start counts on the reference chain, scaled to T
        c("diffusion.sample_steps", lambda v: v is None or (_int(v) and 1 <= v <= ref),
          f"null (the whole chain) or an official start in 1..{ref} (counted on the diffusion.beta_steps chain, "
          f"scaled to timesteps={T})")
    else:
        c("diffusion.sample_steps", lambda v: v is None or (_int(v) and 1 <= v <= T),
          f"null (all {T} steps) or an integer in 1..{T} (diffusion.timesteps)")
    c("diffusion.eta", lambda v: 0 <= v <= 1, "a value in [0, 1]")
    c("diffusion.num_samples", lambda v: _int(v) and v >= 1, "an integer >= 1")
    c("model.dcg.roi_count", lambda v: _int(v) and v >= 1, "an integer >= 1")
    c("model.dcg.output_stride", lambda v: v is None or v in OUTPUT_STRIDES,
      f"null (chosen from the image size) or one of {', '.join(map(str, OUTPUT_STRIDES))}")
    c("model.dcg.crop_size", lambda v: v is None or (_int(v) and 1 <= v <= cfg["dataset"]["image_size"]),
      f"null (one CAM cell) or an integer in 1..{cfg['dataset']['image_size']} (dataset.image_size)")
    c("model.dcg.roi_mode", lambda v: v in ROI_MODES, f"one of {', '.join(ROI_MODES)}")
    c("model.dcg.crop_channels", lambda v: v in ("rgb", "red"), "'rgb' or 'red'")
    c("model.dcg.fusion_weight", lambda v: 0 <= v <= 1, "a value in [0, 1]")
    c("model.dcg.top_t", lambda v: 0 < v <= 1, "a fraction in (0, 1]")
    check_architecture(cfg)
    size, dcg = cfg["dataset"]["image_size"], cfg["model"]["dcg"]
    geo = cam_geometry(size, dcg["output_stride"], dcg["crop_size"])
    c("model.dcg.roi_count", lambda v: v <= geo.positions,
      f"at most {geo.positions} (crop positions on the {geo.grid}x{geo.grid} CAM at dataset.image_size={size}, "
      f"output_stride={geo.stride}, crop_size={geo.crop_size})")
