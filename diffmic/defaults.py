"""Defaults for configs read back from a checkpoint or a bundle (written by an older version, which may lack keys
added since). The defaults live in configs/ alone: a missing key is filled from the YAML that holds it, never from a
second default written in code; a key whose default changed after such files were written is filled with what those
runs did (BEFORE_THE_KEY), since the current YAML would describe another model."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import yaml


def _config_dir() -> Path:
    """The defaults: DIFFMIC_CONFIG_DIR if set, else the configs shipped in the installed package (a wheel puts the
    checkout's configs/ there), else the checkout's configs/ (an editable install or a working copy)."""
    if os.environ.get("DIFFMIC_CONFIG_DIR"):
        return Path(os.environ["DIFFMIC_CONFIG_DIR"])
    here = Path(__file__).resolve().parent
    shipped = here / "configs"
    return shipped if (shipped / "config.yaml").is_file() else here.parent / "configs"


CONFIG_DIR = _config_dir()

# (group, key path) -> the value every run written before the key existed used
BEFORE_THE_KEY = {("model", "denoiser", "output"): "eps",  # the ε head: the only kind there was then
                 ("model", "kind"): "diffmic"}  # DiffMIC-v2 came later
GROUPS = {"model": "model/{kind}.yaml", "diffusion": "diffusion/card.yaml"}  # what shapes a read-back model


def _merge(defaults: dict, given: dict) -> dict:
    out = copy.deepcopy(given)
    for key, value in defaults.items():
        if key not in out:
            out[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _merge(value, out[key])
    return out


def complete(cfg: dict) -> dict:
    """`cfg` with every key of the model-shaping groups it lacks filled (BEFORE_THE_KEY first, then configs/)."""
    out = copy.deepcopy(cfg)
    for path, value in BEFORE_THE_KEY.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node.setdefault(path[-1], value)
    kind = out["model"]["kind"]
    if not isinstance(kind, str) or not kind.isidentifier():  # read from a file: never a path
        raise ValueError(f"model.kind={kind!r}: expected a model name such as diffmic or diffmic_v2")
    for group, file in GROUPS.items():
        path = CONFIG_DIR / file.format(kind=kind)
        if not path.is_file():
            raise ValueError(f"model.kind={kind!r}: no configs/{file.format(kind=kind)} describes it")
        out[group] = _merge(yaml.safe_load(path.read_text()) or {}, out.get(group) or {})
    return out
