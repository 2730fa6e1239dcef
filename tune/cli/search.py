"""`python tune/search.py [overrides]`: search DiffMIC hyperparameters per dataset with Ray Tune + Optuna.

    python tune/search.py "datasets=[synthetic]" search.num_samples=8 train.epochs=4 storage=s3 storage.uri=s3://b/p
    ray job submit --working-dir . -- python tune/search.py …

Per dataset: an Optuna (TPE) study sampling `search.space`, ASHA stopping weak trials on the per-epoch validation
metric, each trial a Ray Train run. At the end the best trial (on validation) is tested once and exported, and
`<storage>/<experiment>/{summary,best}.csv` are written. Running again with the same experiment name resumes.
Everything is checked (config, space, data, storage) before any trial starts.
"""

from __future__ import annotations
import sys
from diffmic.cli import CONFIG_DIR, one_line_errors, to_plain
from tune.study.checks import check_search_overrides
from tune.stages.pipeline import search


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    @hydra.main(config_path=str(CONFIG_DIR), config_name="search", version_base="1.3")
    def _main(cfg) -> None:
        try:
            with one_line_errors("search"):
                hc = HydraConfig.get()  # extra config dirs (hydra.searchpath) reach each dataset's compose too
                searchpath = [o for o in hc.overrides.hydra if o.startswith("hydra.searchpath=")]
                search(to_plain(cfg), [*hc.overrides.task, *keys, *searchpath], own)
        except Exception:  # noqa: BLE001 — Hydra would echo the overrides (URLs with passwords) unredacted
            import traceback

            from diffmic.secrets import redact, redact_url
            print(redact_url(redact(traceback.format_exc())), file=sys.stderr, end="")
            sys.exit(1)

    # `roots` starts empty, and Hydra refuses new keys in a composed config: `roots.NAME=PATH` is taken as `++roots…`
    sys.argv = [f"++{a}" if a.startswith("roots.") else a for a in sys.argv]
    # `datasets.NAME.KEY=V` reaches dataset NAME alone, `dataset.KEY=V` each dataset that has KEY (tune/study/overrides.py):
    # the driver's own config (the default dataset's) never sees them; each dataset's composed config does
    from tune.study.overrides import is_dataset_key, split_per_dataset
    args, own = split_per_dataset(sys.argv[1:])
    keys = [a for a in args if is_dataset_key(a)]
    sys.argv = [sys.argv[0], *(a for a in args if not is_dataset_key(a))]
    if any(a.replace(" ", "") in ("search.space={}", "search.space=null") for a in args):
        # Hydra merges a mapping into the default one: `{}` would silently leave the whole default space searched
        print("search: error: search.space={} does not empty the space (Hydra merges it into the default one): "
              "drop parameters with ~search.space.NAME, or pick another space with search=<name>", file=sys.stderr)
        sys.exit(2)
    if not any(a.startswith("hydra.searchpath") for a in args):  # extra config dirs: Hydra's own message then
        with one_line_errors("search"):
            check_search_overrides(args + [f"datasets.{n}.{o}" for n, extra in own.items() for o in extra])
    _main()
