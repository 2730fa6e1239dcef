"""A self-contained model bundle: what a user needs to load a trained DiffMIC anywhere.

    model.safetensors   weights (EMA / best-validation weights, whichever the run evaluated with)
    config.json         the fully resolved training config (rebuilds the architecture)
    bundle.json         class names, preprocessing, sampler defaults, metrics, provenance, library versions
    manifest.json       {"format": N, "files": {name: sha256}} — verified before anything is loaded

Nothing in a bundle is unpickled: weights are safetensors, the rest is JSON.
"""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffmic.checkpoint import to_jsonable
from diffmic.config import ConfigError, check_architecture
from diffmic.errors import DiffmicError
from diffmic.models import DiffMIC, build_model
from diffmic.defaults import complete

BUNDLE_FORMAT = 1
WEIGHTS, CONFIG, META, MANIFEST = "model.safetensors", "config.json", "bundle.json", "manifest.json"


class BundleError(DiffmicError, ValueError):
    """A bundle that cannot be trusted or used; one line naming the file and the problem."""


@dataclass
class Bundle:
    model: DiffMIC
    config: dict
    meta: dict

    @property
    def class_names(self) -> list[str]:
        return self.meta["class_names"]

    @property
    def temperature(self) -> float:
        """τ of the class probabilities, fitted on the validation split (diffmic.calibration)."""
        return float((self.meta.get("calibration") or {}).get("temperature", 1.0))

    @property
    def dcg_temperature(self) -> float:
        """The DCG's own τ, fitted on the same split (its figures beside the head's)."""
        return float((self.meta.get("calibration") or {}).get("dcg_temperature", 1.0))

    def temperature_for(self, sampler: str) -> float:
        """The τ of a read-out: the DCG's own for `dcg`, the head's for a chain."""
        return self.dcg_temperature if sampler == "dcg" else self.temperature


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    import numpy
    from diffmic.compat import import_timm
    timm = import_timm()

    import diffmic
    return {"diffmic": diffmic.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def write_bundle(directory: str | Path, model: DiffMIC, cfg: dict, class_names: list[str], metrics: dict,
                 provenance: dict | None = None) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    dataset = cfg["dataset"]
    meta = {
        "class_names": list(class_names),
        "preprocessing": {"image_size": dataset["image_size"], "mean": list(dataset["mean"]),
                          "std": list(dataset["std"]), "resize": "center-square-crop, bilinear"},
        "sampler": {k: cfg["diffusion"][k] for k in ("sampler", "sample_steps", "eta", "num_samples")},
        # τ belongs to the sampler point it was fitted at (the chains' ŷ0 differ between points)
        "calibration": {"temperature": (metrics.get("val") or {}).get("temperature", 1.0),
                        "dcg_temperature": (metrics.get("val") or {}).get("dcg_temperature", 1.0), "fitted_on": "val",
                        "sampler": {k: cfg["diffusion"][k] for k in ("sampler", "sample_steps", "num_samples")}},
        "metrics": metrics,
        "provenance": provenance or {},
        "versions": library_versions(),
    }
    (directory / CONFIG).write_text(json.dumps(to_jsonable(cfg), indent=1))
    (directory / META).write_text(json.dumps(to_jsonable(meta), indent=1))
    files = {name: sha256(directory / name) for name in (WEIGHTS, CONFIG, META)}
    (directory / MANIFEST).write_text(json.dumps({"format": BUNDLE_FORMAT, "files": files}, indent=1))
    return directory


MAX_JSON_BYTES = 4 << 20  # config.json and bundle.json are a few kB; a huge one is not ours


def verify_bundle(directory: str | Path) -> dict:
    """Check the manifest against every file; returns the manifest."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if manifest_path.is_symlink() or not manifest_path.is_file():
        raise BundleError(f"bundle {str(directory)!r}: no {MANIFEST} (expected a bundle directory written by a "
                          "training run, tune/search.py or tune.export)")
    if manifest_path.stat().st_size > MAX_JSON_BYTES:  # checked before it is read: a huge one is not ours
        raise BundleError(f"bundle {str(directory)!r}: {MANIFEST} is {manifest_path.stat().st_size} bytes (expected "
                          f"at most {MAX_JSON_BYTES})")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"bundle {str(directory)!r}: {MANIFEST} is not a valid manifest") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"bundle {str(directory)!r}: format {manifest.get('format')!r} is not supported by this "
                          f"diffmic (expected {BUNDLE_FORMAT}); re-export it with a matching version")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {str(directory)!r}: {MANIFEST} is not a valid manifest")
    for name in (WEIGHTS, CONFIG, META):
        if name not in files:
            raise BundleError(f"bundle {str(directory)!r}: {MANIFEST} does not list {name}")
    for name in files:  # nothing else is read: a manifest naming ../../etc/passwd or /etc/hostname is refused
        if name not in (WEIGHTS, CONFIG, META):
            raise BundleError(f"bundle {str(directory)!r}: {MANIFEST} lists {str(name)[:200]!r}, which is not a "
                              f"bundle file (expected exactly {WEIGHTS}, {CONFIG} and {META})")
    for name, expected in files.items():
        path = directory / name
        if path.is_symlink() or not path.is_file():
            raise BundleError(f"bundle {str(directory)!r}: file {name} is missing (or a link, which is refused)")
        if name != WEIGHTS and path.stat().st_size > MAX_JSON_BYTES:
            raise BundleError(f"bundle {str(directory)!r}: {name} is {path.stat().st_size} bytes (expected at most "
                              f"{MAX_JSON_BYTES})")
        if sha256(path) != expected:
            raise BundleError(f"bundle {str(directory)!r}: file {name} does not match its SHA-256 in {MANIFEST} "
                              f"(changed or truncated)")
    return manifest


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    directory = Path(directory)
    verify_bundle(directory)
    meta = json.loads((directory / META).read_text())
    try:
        config = complete(json.loads((directory / CONFIG).read_text()))  # an older bundle's missing keys
        check_architecture(config)
    except (ConfigError, KeyError, TypeError) as e:
        raise BundleError(f"bundle {str(directory)!r}: {CONFIG}: {e if isinstance(e, ConfigError) else 'malformed'}") \
            from None
    model = build_model(config, len(meta["class_names"]), meta["preprocessing"]["image_size"],
                        initial_weights=False)
    try:
        missing, unexpected = model.load_state_dict(load_file(str(directory / WEIGHTS)), strict=False)
    except RuntimeError as e:  # shapes that do not fit (another class count, another feature_dim)
        raise BundleError(f"bundle {str(directory)!r}: weights do not fit the architecture in {CONFIG} and "
                          f"{META} ({' '.join(str(e).split())[:200]})") from None
    if missing or unexpected:
        raise BundleError(f"bundle {str(directory)!r}: weights do not fit the architecture in {CONFIG} "
                          f"({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return Bundle(model.to(device).eval(), config, meta)
