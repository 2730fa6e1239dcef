"""Which command-line overrides reach which dataset of a search.

A search over several datasets composes one config per dataset (its preset and search preset), so a key is checked
against the datasets it can reach, not against the default dataset alone:

- `dataset.KEY=V` goes to every searched dataset whose config has KEY (`dataset.train_list=…` reaches `pkl`, not
  `synthetic`); a KEY no searched dataset has is one error line;
- `datasets.NAME.KEY=V` (any config key: `datasets.pkl.dataset.train_list=x.pkl`, `datasets.isic2018.train.lr=1e-4`)
  goes to dataset NAME alone; it is taken out of the command line before Hydra sees it (`datasets` is a list there);
- every other override goes to every dataset, as before (`roots.NAME=PATH` is the root's short form).
"""
from __future__ import annotations

import yaml

PER_DATASET = "datasets."


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def named_datasets(args: list[str]) -> list[str] | None:
    """The datasets a command line names with `datasets=[…]` (None: the config's default)."""
    for a in args:
        if key_of(a) == "datasets" and "=" in a:
            value = yaml.safe_load(a.split("=", 1)[1])
            return [str(v) for v in value] if isinstance(value, list) else None
    return None


def split_per_dataset(args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(the overrides Hydra sees, {dataset: its own overrides}) from `datasets.NAME.KEY=V` arguments."""
    common, own = [], {}
    for a in args:
        key = key_of(a)
        if key.startswith(PER_DATASET) and key.count(".") >= 2:
            name, rest = key[len(PER_DATASET):].split(".", 1)
            own.setdefault(name, []).append(f"{rest}={a.split('=', 1)[1] if '=' in a else ''}")
        else:
            common.append(a)
    return common, own


def is_dataset_key(override: str) -> bool:
    return key_of(override).startswith("dataset.")


def for_dataset(name: str, overrides: list[str], own: dict[str, list[str]], has_key) -> list[str]:
    """The overrides that dataset `name` composes with: the common ones, `dataset.*` keys its config has
    (`has_key(dotted)`), then its own."""
    kept = [o for o in overrides if key_of(o) not in ("datasets", "dataset")]
    kept = [o for o in kept if not is_dataset_key(o) or o.startswith(("~", "+")) or has_key(key_of(o))]
    return [*kept, *own.get(name, [])]


def check(args: list[str], check_overrides, compose_ok, default_datasets: list[str]) -> None:
    """One line, before any work, for a key no searched dataset has or a per-dataset override of another dataset.
    `check_overrides(overrides)` prints the one line (and exits) for overrides that do not compose;
    `compose_ok(dataset, overrides)` says whether they compose for that dataset."""
    from tune.study.space import SearchError

    common, own = split_per_dataset(args)
    names = named_datasets(common) or default_datasets
    names = [n for n in names if compose_ok(n, [])]  # an unknown dataset is the search's own check to name
    if not names:
        return
    for name, extra in own.items():
        if name not in names:
            raise SearchError(f"datasets.{name}.…: {name!r} is not searched; expected one of datasets="
                              f"[{', '.join(names)}]")
        for o in extra:
            if not compose_ok(name, [o]):
                check_overrides([f"dataset={name}", o])
    check_overrides([o for o in common if not is_dataset_key(o)])
    for o in (o for o in common if is_dataset_key(o) and not o.startswith("~")):
        if not any(compose_ok(name, [o]) for name in names):
            check_overrides([f"dataset={names[0]}", o])
