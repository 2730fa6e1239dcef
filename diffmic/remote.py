"""Inputs that live elsewhere (s3://…) and training on several workers: what the core asks of the packages built on it.

The core imports no orchestration code. A package that can fetch remote URIs or run a configuration on a cluster
registers itself under the entry-point group ``diffmic`` (this project's pyproject.toml registers tune/):

    fetch = "module:function"   fetch(uri, cache_dir) -> Path   a local copy of a remote file or folder
    fit   = "module:function"   fit(cfg) -> dict                one configuration through Ray Train
    export = "module:function"  export(argv)                    `python -m diffmic.export`: bundles from a search's record

Without them the core trains, evaluates and predicts from local files in one process.
"""
from __future__ import annotations

import os
import re
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from diffmic.errors import DiffmicError
from diffmic.choices import STREAMS

GROUP = "diffmic"


def is_remote(uri: Any) -> bool:
    """A URI with a scheme other than file:// (s3://bucket/key)."""
    return isinstance(uri, str) and bool(re.match(r"[A-Za-z][A-Za-z0-9+.\-]*://", uri)) and not uri.startswith("file://")


def plugin(name: str, needed_for: str) -> Callable:
    found = entry_points(group=GROUP, name=name)
    if not found:
        raise DiffmicError(f"{needed_for} needs the {name!r} plugin (entry point group {GROUP!r}), which no installed "
                           "package provides: install this project with `pip install -e .` (or `make install`)")
    return next(iter(found)).load()


def cache_dir(kind: str) -> Path:
    """Where fetched inputs of one kind (datasets, weights, bundles) live on this node: $DIFFMIC_CACHE/<kind>."""
    return Path(os.environ.get("DIFFMIC_CACHE") or Path.home() / ".cache" / "diffmic") / kind


def fetch(uri: str, kind: str) -> Path:
    """A local copy of a remote URI, cached per node (a later call fetches only what changed)."""
    return plugin("fetch", f"reading {uri}")(uri, cache_dir(kind))


def localize(cfg: dict) -> dict:
    """The config with its remote inputs fetched into this node's cache and pointed at there.

    The dataset keeps its URI as `origin_root`, so a checkpoint's config still names data every node can reach.
    Backbone weights files (`model.<stream>.weights`) only initialise a run, so their local path is enough.
    """
    root = cfg["dataset"].get("origin_root") or cfg["dataset"].get("root")
    if is_remote(root):
        cfg = {**cfg, "dataset": {**cfg["dataset"], "root": str(fetch(root, "datasets")), "origin_root": root}}
    for stream in STREAMS:
        weights = cfg["model"][stream].get("weights")
        if is_remote(weights):
            local = str(fetch(weights, "weights"))
            cfg = {**cfg, "model": {**cfg["model"], stream: {**cfg["model"][stream], "weights": local}}}
    return cfg
