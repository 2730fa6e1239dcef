"""`python tune/search.py [overrides]`: search DiffMIC hyperparameters per dataset with Ray Tune + Optuna.

    python tune/search.py "datasets=[synthetic]" search.num_samples=8 train.epochs=4 storage=s3 storage.uri=s3://b/p
    ray job submit --working-dir . -- python tune/search.py …

Per dataset: an Optuna (TPE) study sampling `search.space`, ASHA stopping weak trials on the per-epoch validation
metric, each trial a Ray Train run. At the end the best trial (on validation) is tested once and exported, and
`<storage>/<experiment>/{summary,best}.csv` are written. Running again with the same experiment name resumes.
Everything is checked (config, space, data, storage) before any trial starts.
"""

from __future__ import annotations
from pathlib import Path
from diffmic.cli import to_plain
from tune.study.checks import check_knobs, check_search, known_datasets




def plan(cfg: dict, overrides: list[str], own: dict[str, list[str]] | None = None):
    """Every check a search needs, before Ray starts: search knobs, storage, each dataset's config, space, weights,
    data. Each dataset composes its own config (its preset and search preset) and gets its own root; `own` holds the
    overrides of one dataset each (`datasets.NAME.KEY=V`, tune/study/overrides.py)."""
    from hydra import compose

    from diffmic.config import dotted_keys
    from tune.study.overrides import for_dataset

    from diffmic.errors import DiffmicError
    from tune.study.resume import verify_ray_state
    from tune.study.space import SearchError
    from tune.storage import open_storage

    check_search(cfg, known_datasets(overrides))
    storage = open_storage(cfg["storage"]["uri"], create_bucket=cfg["storage"]["create_bucket"])
    if cfg["resume"] and not storage.exists(cfg["experiment"]):
        raise SearchError(f"resume=true but there is no experiment {cfg['experiment']!r} under {storage.uri}")
    searches = []
    for name in cfg["datasets"]:
        searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]  # extra config dirs reach it too
        keys = set(dotted_keys(to_plain(compose(config_name="search", overrides=[*searchpath, f"dataset={name}"]))))
        mine = for_dataset(name, overrides, own or {}, lambda key: key in keys)
        dcfg = to_plain(compose(config_name="search", overrides=[*mine, f"dataset={name}"]))
        root = (cfg["roots"] or {}).get(name)
        if root is not None:
            dcfg["dataset"]["root"] = str(root)
        where = f"roots.{name}" if root is not None else "dataset.root"
        try:
            searches.append(plan_dataset(name, dcfg, storage, cfg["experiment"]))
        except (ValueError, FileNotFoundError, DiffmicError) as e:  # one line naming the dataset it belongs to
            message = f"dataset {name} ({where}={dcfg['dataset']['root']}): {e}"
            try:
                error = type(e)(message)
            except TypeError:  # an exception type that takes more than a message
                error = SearchError(message)
            raise error from None
    for s in searches:  # an experiment resumed: Ray's state files are checked before Ray could unpickle them
        verify_ray_state(storage, s.rel, s.record.state_key(s.dataset), trust=cfg["trust_ray_state"])
    return storage, searches


def plan_dataset(name: str, dcfg: dict, storage, experiment: str):
    from diffmic.config import split_seed, validate_config
    from diffmic.data import build_splits
    from diffmic.remote import localize
    from diffmic.models.backbone import check_weights_fit
    from diffmic.weights import check_pretrained
    from tune.selection.points import check_grid
    from tune.study.dataset import DatasetSearch
    from tune.study.space import check_against_config, parse_space

    s = dcfg["search"]  # one selection rule: the search's metric and mode pick epochs, checkpoints and trials alike
    check_knobs(s)
    dcfg["train"].update(select_metric=s["metric"].removeprefix("val_"), select_mode=s["mode"])
    validate_config(dcfg)
    params = parse_space(dcfg["search"]["space"], dcfg)
    check_against_config(params, dcfg)
    timesteps = next((list(p.values) for p in params if p.key == "diffusion.timesteps"),  # choice, randint bounds
                     [dcfg["diffusion"]["timesteps"]])
    check_grid(s["pareto"], [int(t) for t in timesteps])
    local = localize(dcfg)  # s3:// data and weights into this node's cache (they must exist)
    root = local["dataset"].get("root")
    if root and not Path(str(root)).expanduser().is_dir():  # the commonest mistake, found before the weights
        raise FileNotFoundError(f"dataset root not found: {root}; expected the dataset's root folder")
    check_pretrained(local["model"])  # cheap, so before the images are read
    check_weights_fit(local["model"])
    data = build_splits(local["dataset"], seed=split_seed(dcfg))
    print(f"[search] {name}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test images, "
          f"{data.num_classes} classes; {len(params)} parameters, {dcfg['search']['num_samples']} trials"
          + (f"; splits {data.grouping}" if data.grouping else ""), flush=True)
    search = DatasetSearch(name, dcfg, params, storage, experiment)
    search.record.write_splits(name, data.membership)  # what every trial trains, validates and tests on
    return search
