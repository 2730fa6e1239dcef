"""`python -m diffmic.train [hydra overrides]`: train and evaluate one DiffMIC configuration.

With `scaling.num_workers=0` (the default on a CPU machine) the run happens in this process and writes
`output_dir/{config.json, history.csv, metrics.json, checkpoint/, model/}`. With N >= 1 it runs through Ray Train
(N workers, on the cluster at RAY_ADDRESS or a local one) and keeps checkpoints and results under `storage.uri`.
"""
from __future__ import annotations

import sys

from diffmic.cli import CONFIG_DIR, check_overrides, one_line_errors, to_plain


def run(cfg: dict) -> dict:
    """Run one configuration; returns {"val": …, "test": …} metrics."""
    from diffmic.config import validate_config

    validate_config(cfg)  # before torch is imported: a typo costs a fraction of a second
    from diffmic.engine import train
    from diffmic.models.backbone import check_weights_fit
    from diffmic.remote import localize, plugin
    from diffmic.session import LocalSession
    from diffmic.weights import check_pretrained

    if cfg["scaling"]["num_workers"] >= 1:
        return plugin("fit", "scaling.num_workers >= 1 (training through Ray Train)")(cfg)
    cfg = localize(cfg)  # remote data or weights (s3://…) into this node's cache
    check_pretrained(cfg["model"])  # before anything is written or read: never a silent random start
    check_weights_fit(cfg["model"])
    session = LocalSession(cfg["output_dir"], resume=cfg["resume"], amp=cfg["train"]["amp"])  # no overwrite
    result = train(cfg, session)  # writes config.json once data and model are built
    return {"val": result.val, "test": result.test}


def main() -> None:
    import hydra

    check_overrides("config", sys.argv[1:], "diffmic.train")

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def _main(cfg) -> None:
        with one_line_errors("diffmic.train"):
            run(to_plain(cfg))

    _main()


if __name__ == "__main__":
    sys.exit(main())
