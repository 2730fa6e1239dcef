"""The experiment record: what a search leaves under its storage root, and the only code that knows that layout.

    <root>/<experiment>/search.json              format, every dataset's search (metric, mode, space, budget), times
    <root>/<experiment>/summary.{parquet,csv}    one row per trial (its parameters, its best epoch's val_* metrics)
    <root>/<experiment>/history.{parquet,csv}    one row per trial and reported epoch
    <root>/<experiment>/best.{parquet,csv}       one row per dataset: the best trial, its val_* and test_* metrics
                                                 (and val_*_mean/_sd over the finalists' repeats)
    <root>/<experiment>/pareto.{parquet,csv}     one row per trial and sampler point: val_* metrics, prediction cost,
                                                 on_front (tune/selection/pareto.py)
    <root>/<experiment>/finalists.{parquet,csv}  one row per finalist run: its parameters, repeat, seed, val_*
    <root>/<experiment>/best.json                per dataset: the same with the confusion matrix and class names
    <root>/<experiment>/optuna/<dataset>.db      each dataset's Optuna study (SQLite)
    <root>/<experiment>/state/<dataset>.json     what a new head needs to resume (tune/study/resume.py): ASHA's rungs,
                                                 the signatures of Ray's state files
    <root>/<experiment>/report.html              the results page (tune/report.py; rewritten while the search runs)
    <root>/<experiment>/explain/<dataset>/       where the best model looks: index.json and a heat-map PNG of each
                                                 test image shown (diffmic/explain.py)
    <root>/<experiment>/tensorboard/<dataset>/<trial_id>/   TensorBoard event files of each trial (tune/pages/tracking.py)
    <root>/<experiment>/<dataset>/               Ray Tune's experiment: trials and their checkpoints
    <root>/<experiment>/finalists/<dataset>/     the finalists' Ray Train runs and their checkpoints
    <root>/<experiment>/best/<dataset>/          this experiment's best model of each dataset (a bundle)
    <root>/<experiment>/exports/<dataset>/<trial>/   bundles exported with `tune.export --trial`
    <root>/best/<dataset>/                       the current best model of each dataset, across experiments
                                                 (changed only by tune/promote.py; the replaced ones are kept in
                                                 <root>/best-previous/<dataset>/)

tune/search.py writes it, tune/export.py and tune/report.py read it, all through `Record`. The format is versioned
(`format` in search.json); users' scripts may read the tables directly (README: "The experiment record").
"""

from __future__ import annotations
from dataclasses import dataclass, field
import pandas as pd
from tune.storage import Storage
from tune.record.experiment import CHECKPOINT, Record
from diffmic.selection import best
from diffmic.selection import ranked


def describe(cfg: dict, params) -> dict:
    """One dataset's search as search.json keeps it: selection rule, budget and space."""
    s = cfg["search"]
    return {"metric": s["metric"], "mode": s["mode"], "num_samples": s["num_samples"], "scheduler": s["scheduler"],
            "sampler": s["sampler"], "epochs_per_trial": cfg["train"]["epochs"],
            "space": {p.name: {"key": p.key, "kind": p.kind, "values": list(p.values)} for p in params}}


def best_trial(summary: pd.DataFrame, metric: str, mode: str) -> pd.Series | None:
    """The trial whose best epoch is best on the selection rule, among those that kept a checkpoint."""
    if metric not in summary or CHECKPOINT not in summary:
        return None
    ok = summary[summary[metric].notna() & summary[CHECKPOINT].notna()]
    if ok.empty:
        return None
    return ok.iloc[best(ok.to_dict("records"), metric, mode)]  # the one rule (diffmic/selection.py)


@dataclass
class Results:
    """A whole record, read once: what the report and export are built from."""
    record: Record
    meta: dict                  # search.json
    summary: pd.DataFrame       # one row per trial
    history: pd.DataFrame       # one row per trial and epoch
    best: dict                  # best.json: {dataset: best_entry}
    pareto: pd.DataFrame = field(default_factory=pd.DataFrame)     # one row per trial and sampler point
    finalists: pd.DataFrame = field(default_factory=pd.DataFrame)  # one row per finalist run
    live: dict = field(default_factory=dict)  # a running search (tune/pages/live.py): dataset -> its progress
    test_looks: pd.DataFrame = field(default_factory=pd.DataFrame)  # the ledger (diffmic/ledger.py)
    searches: dict = field(init=False)

    def __post_init__(self) -> None:
        self.searches = self.meta["datasets"]

    @classmethod
    def read(cls, record: Record) -> Results:
        """A whole record, read once."""
        meta = record.read_search()
        summary, history = record.read_table("summary"), record.read_table("history")
        pareto, finalists = record.read_table("pareto"), record.read_table("finalists")
        for frame in (summary, history, pareto, finalists):
            if "trial_id" in frame:  # Ray's hex ids stay text ("4e000003" is not a number)
                frame["trial_id"] = frame["trial_id"].astype(str)
        if summary.empty:
            summary = pd.DataFrame(columns=["dataset", "trial_id", "status"])
        return cls(record, meta, summary, history, record.read_best(), pareto, finalists,
                   test_looks=record.read_test_looks())

    @property
    def storage(self) -> Storage:
        return self.record.storage

    @property
    def experiment(self) -> str:
        return self.record.experiment

    @property
    def datasets(self) -> list[str]:
        return list(self.searches)

    def metric(self, dataset: str) -> str:
        return self.searches[dataset]["metric"]

    def minimize(self, dataset: str) -> bool:
        return self.searches[dataset]["mode"] == "min"

    def params(self, dataset: str) -> list[tuple[str, str, list]]:
        """(config key, kind, values) of each parameter searched for the dataset."""
        return [(p["key"], p["kind"], list(p["values"])) for p in self.searches[dataset]["space"].values()]

    def trials(self, dataset: str) -> pd.DataFrame:
        return self.summary[self.summary["dataset"].astype(str) == dataset]

    def ranked(self, dataset: str) -> pd.DataFrame:
        """The dataset's trials that reported its metric, best first."""
        t, metric = self.trials(dataset), self.metric(dataset)
        return t.iloc[ranked(t.to_dict("records"), metric, "min" if self.minimize(dataset) else "max")] if metric in t \
            else t.iloc[0:0]
