"""Everything a search checks before any Ray, S3 or training work, each problem one line naming the value: the
search as a whole (datasets, roots, names), each dataset's `search` knobs, the override keys against the datasets
they reach (tune/study/overrides.py)."""
from __future__ import annotations

from diffmic.cli import CONFIG_DIR, check_overrides
from diffmic.secrets import redact_url
from tune.study.space import SearchError

SAMPLERS, SCHEDULERS, MODES = ("tpe", "random", "cmaes", "qmc"), ("asha", "none"), ("max", "min")


def check_search(cfg: dict, known: list[str] | None = None) -> None:
    """The search as a whole: its datasets, their roots, the experiment name. Each dataset's own search knobs (a
    search_preset may set them) are checked on its composed config by check_knobs."""
    from diffmic.config import check_name

    datasets = cfg["datasets"]
    known = known or sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))
    if not datasets or not isinstance(datasets, list):
        raise SearchError(f"datasets={datasets!r}: expected a non-empty list, e.g. datasets=[synthetic]")
    for name in datasets:
        if name not in known:
            raise SearchError(f"datasets: unknown dataset {name!r}: expected one of {', '.join(known)} "
                              f"(or a file configs/dataset/{name}.yaml)")
    roots = cfg["roots"] or {}
    if not isinstance(roots, dict):
        raise SearchError(f"roots={roots!r}: expected a mapping of dataset name to root, e.g. roots.isic2018=/data/isic")
    for name, root in roots.items():
        if name not in datasets:
            raise SearchError(f"roots.{name}={root!r}: {name!r} is not searched; expected one of datasets="
                              f"[{', '.join(datasets)}]")
    check_name("experiment", cfg["experiment"])
    for key in ("trust_ray_state", "report", "export"):
        if not isinstance(cfg[key], bool):
            raise SearchError(f"{key}={cfg[key]!r}: expected true or false")
    check_tracking(cfg)
    every = cfg["report_every_s"]
    if not isinstance(every, (int, float)) or isinstance(every, bool) or every <= 0:
        raise SearchError(f"report_every_s={every!r}: expected seconds > 0 (how often the live report may be "
                          "rewritten)")


def check_knobs(s: dict) -> None:
    """One dataset's `search` section."""
    from diffmic.metrics import SCALAR_METRICS
    from tune.selection.controls import check_controls
    from tune.selection.finalists import REPEAT_MODES

    def need(key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise SearchError(f"search.{key}={s.get(key)!r}: expected {expected}")

    need("num_samples", isinstance(s["num_samples"], int) and s["num_samples"] >= 1, "an integer >= 1")
    metrics = [f"val_{m}" for m in SCALAR_METRICS]
    need("metric", s["metric"] in metrics, f"a reported validation metric: {', '.join(metrics)}")
    need("mode", s["mode"] in MODES, "max or min")
    need("sampler", s["sampler"] in SAMPLERS, f"one of {', '.join(SAMPLERS)}")
    need("scheduler", s["scheduler"] in SCHEDULERS, f"one of {', '.join(SCHEDULERS)}")
    need("grace_period", isinstance(s["grace_period"], int) and s["grace_period"] >= 1, "an integer >= 1")
    need("reduction_factor", s["reduction_factor"] >= 2, "a number >= 2")
    need("max_concurrent_trials", s["max_concurrent_trials"] is None or s["max_concurrent_trials"] >= 1,
         "null or an integer >= 1")
    need("time_budget_s", s["time_budget_s"] is None or s["time_budget_s"] > 0, "null or seconds > 0")
    need("max_cost_ms", s["max_cost_ms"] is None or (isinstance(s["max_cost_ms"], (int, float))
                                                     and not isinstance(s["max_cost_ms"], bool)
                                                     and s["max_cost_ms"] > 0), "null or milliseconds > 0")
    for key in ("finalists", "repeats"):
        need(key, isinstance(s[key], int) and not isinstance(s[key], bool) and s[key] >= 0, "an integer >= 0")
    need("repeats", not s["finalists"] or s["repeats"] >= 1, "an integer >= 1 when search.finalists > 0")
    need("repeat_mode", s["repeat_mode"] in REPEAT_MODES, " or ".join(REPEAT_MODES))
    check_controls(s["controls"])
    check_optuna_storage(s["optuna_storage"])
    need("max_cost_ms", s["max_cost_ms"] is None or bool(s["pareto"]),
         "null when search.pareto=[] (no sampler point is measured, so no cost can be chosen within)")


def check_optuna_storage(url) -> None:
    """An external study URL that SQLAlchemy can use: parsed and its driver importable, before any trial (the URL
    is named with its password masked)."""
    if url is None:
        return
    from diffmic.secrets import redact_url

    shown = redact_url(str(url))
    try:
        from sqlalchemy.engine import make_url
        dialect = make_url(str(url)).get_dialect()
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()  # imports the driver; connects to nothing
    except Exception as e:  # noqa: BLE001 (no driver, unknown dialect, malformed URL: each one line)
        reason = " ".join(str(e).split()).replace(str(url), shown)[:160]
        raise SearchError(f"search.optuna_storage={shown}: cannot be used here ({type(e).__name__}: {reason}); "
                          "expected a SQLAlchemy URL whose driver is installed, e.g. postgresql+psycopg2://…") from None


def known_datasets(overrides: list[str]) -> list[str] | None:
    """The `dataset` configs Hydra can compose: configs/dataset/ and any `hydra.searchpath=[…]` given."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return None
    searchpath = [o for o in overrides if o.startswith("hydra.searchpath=")]
    return sorted(GlobalHydra.instance().config_loader().get_group_options("dataset", config_name="search",
                                                                           overrides=searchpath))


def check_search_overrides(args: list[str]) -> None:
    """Every override checked against the config of each dataset it can reach (tune/study/overrides.py)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from tune.study import overrides

    def composes(extra: list[str]) -> bool:
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="search"):
            try:
                compose("search", overrides=extra)
                return True
            except (HydraException, OmegaConfBaseException):
                return False

    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name="search"):
        default = list(compose("search").datasets)
    overrides.check(args, lambda extra: check_overrides("search", extra, "search"),
                    lambda name, extra: composes([f"dataset={name}", *extra]), default)


def check_tracking(cfg: dict) -> None:
    """Up-front: one line naming what tracking (tune/pages/tracking.py) needs and lacks."""
    t = cfg["tracking"]
    if not isinstance(t["tensorboard"], bool):
        raise SearchError(f"tracking.tensorboard={t['tensorboard']!r}: expected true or false")
    if t["name"] != "mlflow":
        return
    if not t["uri"]:
        raise SearchError(f"tracking.uri={t['uri']}: expected the MLflow tracking server's URI, "
                          "e.g. http://127.0.0.1:5000")
    check_tracking_uri(str(t["uri"]))
    if redact_url(str(t["uri"])) != str(t["uri"]):  # it would be pickled into tuner.pkl, in the results
        raise SearchError(f"tracking.uri={redact_url(str(t['uri']))}: expected no password in the URI: set "
                          "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise SearchError("tracking=mlflow: the mlflow package is not installed (pip install 'diffmic[mlflow]')") \
            from None


TRACKING_SCHEMES = ("http", "https", "file", "databricks", "sqlite", "postgresql", "mysql", "mssql")


def check_tracking_uri(uri: str) -> None:
    """An MLflow tracking URI that can work: a known scheme, and a host for http(s). Checked before any trial, so
    that a typo does not leave a whole search untracked behind one warning per trial."""
    from urllib.parse import urlsplit

    shown = redact_url(uri)
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0].lower()  # postgresql+psycopg2 -> postgresql
    if scheme not in TRACKING_SCHEMES or (scheme in ("http", "https") and not parts.hostname):
        raise SearchError(f"tracking.uri={shown}: expected an MLflow tracking URI with a scheme and a host, e.g. "
                          f"http://127.0.0.1:5000 (schemes: {', '.join(TRACKING_SCHEMES)})")
