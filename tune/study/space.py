"""Search spaces: named parameters over ordinary config keys, so a trial is a set of Hydra-style overrides.

    space:
      timesteps: {key: diffusion.timesteps, choice: [100, 250, 500, 1000]}
      lr: {key: train.lr, loguniform: [3.0e-4, 2.0e-3]}

A trial's values are keyed by the config key (`diffusion.timesteps`), which is also the column name in the
summary, and `python -m diffmic.train diffusion.timesteps=250 …` re-runs a trial alone.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from diffmic.config import ConfigError, validate_config, with_values
from tune.errors import SearchError

KINDS = ("choice", "uniform", "loguniform", "randint")




@dataclass(frozen=True)
class Param:
    name: str
    key: str
    kind: str
    values: tuple

    def sampler(self):
        from ray import tune
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    def probes(self) -> list:
        """Values worth checking against the config: every choice, or the ends of a range."""
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "randint":
            return [self.values[0], self.values[1] - 1]
        return list(self.values)


def get_key(cfg: dict, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def parse_space(space: dict, cfg: dict) -> list[Param]:
    if not space or all(spec is None for spec in space.values()):
        raise SearchError("search.space is empty: expected at least one parameter")
    params = []
    for name, spec in space.items():
        where = f"search.space.{name}"
        if spec is None:  # `NAME: null` drops a parameter of the space it merges into (a model's own space does)
            continue
        if not isinstance(spec, dict) or "key" not in spec:
            raise SearchError(f"{where}: expected {{key: CONFIG.KEY, <kind>: …}} with kind one of {', '.join(KINDS)}")
        kinds = [k for k in KINDS if k in spec]
        if len(kinds) != 1:
            raise SearchError(f"{where}: expected exactly one of {', '.join(KINDS)} (got {kinds or 'none'})")
        kind, values = kinds[0], spec[kinds[0]]
        try:
            get_key(cfg, spec["key"])
        except KeyError:
            raise SearchError(f"{where}.key={spec['key']!r}: not a key of the training config") from None
        if kind == "choice":
            if not isinstance(values, list) or not values:
                raise SearchError(f"{where}.choice={values!r}: expected a non-empty list")
        else:
            if not isinstance(values, list) or len(values) != 2:
                raise SearchError(f"{where}.{kind}={values!r}: expected [low, high]")
            low, high = values
            if not low < high:
                raise SearchError(f"{where}.{kind}=[{low}, {high}]: empty or inverted range (expected low < high)")
            if kind == "loguniform" and low <= 0:
                raise SearchError(f"{where}.loguniform=[{low}, {high}]: expected low > 0")
        params.append(Param(name, spec["key"], kind, tuple(values)))
    return params


def check_against_config(params: list[Param], cfg: dict, limit: int = 512) -> None:
    """Every value the search can sample must make a valid config (every combination of up to `limit`)."""
    keys = {p.key: p for p in params}
    if "diffusion.sample_steps" in keys:
        samplers = keys["diffusion.sampler"].probes() if "diffusion.sampler" in keys else [cfg["diffusion"]["sampler"]]
        if "official" in samplers:
            raise SearchError("search.space searches diffusion.sample_steps with the official sampler, where it sets "
                              "the chain's start, not its number of steps; expected diffusion.sampler=ddim (or a "
                              "space entry {key: diffusion.sampler, choice: [ddim]})")
        if "ddpm" in samplers:
            raise SearchError("search.space searches diffusion.sample_steps with the ddpm sampler, which always runs "
                              "all diffusion.timesteps steps; expected diffusion.sampler=ddim")
    grids = [[(p.key, v) for v in p.probes()] for p in params]
    combos = list(itertools.islice(itertools.product(*grids), limit + 1))
    if len(combos) > limit:  # too many combinations: check each parameter on its own
        combos = [(kv,) for grid in grids for kv in grid]
    for combo in combos:
        try:
            validate_config(with_values(cfg, dict(combo)))
        except ConfigError as e:
            names = ", ".join(f"{k}={v!r}" for k, v in combo)
            raise SearchError(f"search space value(s) {names} give an invalid config: {e}") from None


def tune_space(params: list[Param]) -> dict:
    return {p.key: p.sampler() for p in params}
