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
    <root>/<experiment>/stages/<dataset>/        what each stage after the trials decided: control.json (the plain
                                                 control's run), finalists.json (the selected run and its repeats'
                                                 statistics), choice.json (the chosen point) (tune/stages/pipeline.py)
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
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
import pandas as pd
from diffmic.checkpoint import to_jsonable
from tune.storage import Storage, open_storage
from tune.storage.base import clean_rel
from diffmic.metrics import prefixed, unprefixed
from tune.errors import RecordError


FORMAT = 1


SEARCH, BEST_DETAILS, REPORT, EXPLAIN = "search.json", "best.json", "report.html", "explain"


TABLES = ("summary", "history", "best", "pareto", "finalists")


PER_DATASET = ("summary", "history", "pareto", "finalists")  # tables with a row per dataset's trial, run or point


CHECKPOINT = "checkpoint_path"  # the summary column that holds a trial's best checkpoint (as Ray reports it)


_LOCK = threading.Lock()  # the record's read-merge-writes (datasets' stages run in threads)




@dataclass
class Record:
    storage: Storage
    experiment: str

    @classmethod
    def at(cls, experiment_uri: str) -> Record:
        """EXPERIMENT_URI (`<storage root>/<experiment>`, local or s3://) -> its record; nothing is created."""
        text = str(experiment_uri).strip().rstrip("/")
        if text.lower().startswith("s3://"):
            root, _, name = text.rpartition("/")
            if root.lower() in ("s3:", "s3:/"):
                raise RecordError(f"bad experiment URI {experiment_uri!r}: expected s3://bucket[/prefix]/EXPERIMENT")
            return cls(open_storage(root, check=False), name)
        path = Path(text.removeprefix("file://")).expanduser().resolve()
        if not path.is_dir():  # checked here: open_storage would create a mistyped local root
            raise RecordError(f"no experiment directory {path}")
        return cls(open_storage(str(path.parent), check=False), path.name)

    # ------------------------------------------------------------ where things are
    @property
    def uri(self) -> str:
        return self.storage.join(self.experiment)

    def key(self, *parts: str) -> str:
        return "/".join((self.experiment, *parts))

    def study_key(self, dataset: str) -> str:
        return self.key("optuna", f"{dataset}.db")

    def state_key(self, dataset: str) -> str:
        return self.key("state", f"{dataset}.json")

    def finalists_key(self, dataset: str) -> str:
        return self.key("finalists", dataset)

    def best_key(self, dataset: str) -> str:
        """This experiment's best model of a dataset (a bundle)."""
        return self.key("best", dataset)

    def best_bundle_uri(self, dataset: str) -> str:
        return self.storage.join(self.best_key(dataset))

    @staticmethod
    def current_key(dataset: str) -> str:
        """The current best of a dataset, shared by every experiment under the root (tune/promote.py)."""
        return f"best/{dataset}"

    def trial_bundle_uri(self, dataset: str, trial_id: str) -> str:
        return self.storage.join(self.experiment, "exports", dataset, trial_id)

    def checkpoint_uri(self, trial: pd.Series) -> str:
        """A trial's checkpoint (as Ray reported it in the summary) as a URI, refused unless it lies inside this
        experiment: the summary is read from storage, and an edited path must not make us copy anything else."""
        rel = self.storage.relative(str(trial[CHECKPOINT]))
        if clean_rel(rel) != rel or not rel.startswith(f"{self.experiment}/"):
            raise RecordError(f"trial {trial['trial_id']}: checkpoint {trial[CHECKPOINT]!r} is not inside the "
                              f"experiment {self.uri}")
        return self.storage.join(rel)

    # ------------------------------------------------------------ writing
    def write_search(self, datasets: dict[str, dict], started: float, wall_time_s: float | None) -> None:
        """datasets: name -> describe(cfg, params) of each dataset's search."""
        self.storage.write_text(self.key(SEARCH), json.dumps(to_jsonable(
            {"format": FORMAT, "experiment": self.experiment, "datasets": datasets, "started": started,
             "wall_time_s": wall_time_s}), indent=1))

    def write_table(self, name: str, frame: pd.DataFrame) -> None:
        """Parquet (typed) and its CSV twin (for spreadsheets and shell tools)."""
        assert name in TABLES, name
        self.storage.write_text(self.key(f"{name}.csv"), frame.to_csv(index=False))
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        self.storage.write_bytes(self.key(f"{name}.parquet"), buffer.getvalue())

    def write_best(self, details: dict[str, dict]) -> None:
        """details: dataset -> best_entry(...); the best table is derived from it, so the two always agree."""
        self.write_table("best", pd.DataFrame([best_row(d, e) for d, e in details.items()]))
        self.storage.write_text(self.key(BEST_DETAILS), json.dumps(to_jsonable(details), indent=1))

    def write_rows(self, name: str, dataset: str, frame: pd.DataFrame) -> None:
        """One dataset's rows of a table, written as soon as its stage has them; the rows of the experiment's other
        datasets (searched beside it, or by an earlier invocation under the same name) are kept, never dropped."""
        assert name in PER_DATASET, name
        with _LOCK:  # the datasets' stages run in threads of one driver: read, merge and write as one step
            old = self.read_table(name)
            kept = old[old["dataset"].astype(str) != dataset] if "dataset" in old else old.iloc[:0]
            parts = [f for f in (kept, frame) if len(f)]
            self.write_table(name, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())

    def read_rows(self, name: str, dataset: str) -> pd.DataFrame:
        """One dataset's rows of a table (trial ids as text); empty when its stage has not written them yet."""
        frame = self.read_table(name)
        if "dataset" not in frame:
            return pd.DataFrame()
        frame = frame[frame["dataset"].astype(str) == dataset].reset_index(drop=True)
        return frame.assign(trial_id=frame["trial_id"].astype(str)) if "trial_id" in frame else frame

    def write_best_entry(self, dataset: str, entry: dict) -> None:
        """A dataset's tested (and exported) model, into best.json and best.csv, as soon as it is tested."""
        with _LOCK:
            self.write_best({**self.read_best(), dataset: entry})

    def add_searches(self, searches: dict[str, dict], started: float, wall_time_s: float | None = None) -> None:
        """search.json, written when the search starts (so that the record reads while it runs) and again when it
        ends with its wall time; other datasets' descriptions are kept."""
        with _LOCK:
            others = self.read_search()["datasets"] if self.storage.exists(self.key(SEARCH)) else {}
            self.write_search({**{d: o for d, o in others.items() if d not in searches}, **searches}, started,
                              wall_time_s)

    def write_stage(self, dataset: str, stage: str, value: dict) -> None:
        """stages/<dataset>/<stage>.json: what a stage after the trials decided (tune/stages/pipeline.py), written
        when it completes; a resumed search continues at the first stage whose artefact is missing."""
        self.storage.write_text(self.key("stages", dataset, f"{stage}.json"), json.dumps(to_jsonable(value), indent=1))

    def read_stage(self, dataset: str, stage: str) -> dict | None:
        try:
            value = json.loads(self.storage.read_text(self.key("stages", dataset, f"{stage}.json")))
        except FileNotFoundError:
            return None
        return value if isinstance(value, dict) else None

    def write_explanations(self, dataset: str, items: list[dict], images: list[bytes]) -> None:
        """Where the dataset's best model looks: one JSON entry and one PNG per test image shown."""
        for i, png in enumerate(images):
            self.storage.write_bytes(self.key(EXPLAIN, dataset, f"{i}.png"), png)
        self.storage.write_text(self.key(EXPLAIN, dataset, "index.json"), json.dumps(to_jsonable(
            [{**item, "image": f"{i}.png"} for i, item in enumerate(items)])))

    def read_explanations(self, dataset: str) -> list[tuple[dict, bytes]]:
        """(entry, PNG) of each image shown; [] when there are none. Only the PNGs this layout names are read."""
        try:
            items = json.loads(self.storage.read_text(self.key(EXPLAIN, dataset, "index.json")))
        except FileNotFoundError:
            return []
        out = []
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict):
                try:
                    out.append((item, self.storage.read_bytes(self.key(EXPLAIN, dataset, f"{i}.png"))))
                except FileNotFoundError:
                    continue
        return out

    def append_test_look(self, row: dict) -> None:
        """One line of the experiment's ledger of test looks (diffmic/ledger.py); storage has no append, so the file
        is read and written back, under a lock shared by the datasets' threads."""
        from diffmic import ledger
        with _LOCK:
            try:
                text = self.storage.read_text(self.key(ledger.LEDGER))
            except FileNotFoundError:
                text = ""
            self.storage.write_text(self.key(ledger.LEDGER), text + ledger.lines([row], header=not text))

    def read_test_looks(self) -> pd.DataFrame:
        from diffmic import ledger
        try:
            return pd.read_csv(io.StringIO(self.storage.read_text(self.key(ledger.LEDGER))), dtype={"trial": str})
        except FileNotFoundError:
            return pd.DataFrame(columns=list(ledger.FIELDS))

    def write_splits(self, dataset: str, membership: list[dict]) -> None:
        """splits/<dataset>.csv: the membership every trial of the dataset trains, validates and tests on (image,
        group, split, carve), as nnU-Net writes its folds, so that a reader can check the split."""
        if membership:
            self.storage.write_text(self.key("splits", f"{dataset}.csv"), pd.DataFrame(membership).to_csv(index=False))

    def write_study(self, dataset: str, db: bytes) -> None:
        self.storage.write_bytes(self.study_key(dataset), db)

    def write_report(self, page: str) -> str:
        self.storage.write_text(self.key(REPORT), page)
        return self.storage.join(self.experiment, REPORT)

    def read_report(self) -> bytes:
        """The page as it is now (FileNotFoundError when there is none yet)."""
        return self.storage.read_bytes(self.key(REPORT))

    # ------------------------------------------------------------ reading
    def read_search(self) -> dict:
        try:
            meta = json.loads(self.storage.read_text(self.key(SEARCH)))
        except FileNotFoundError:
            raise RecordError(f"no search results at {self.uri}: expected {SEARCH} there (tune/search.py writes "
                              "it when a search ends)") from None
        if meta.get("format", 0) > FORMAT:
            raise RecordError(f"{self.uri}/{SEARCH} has format {meta['format']}; this version reads format "
                              f"{FORMAT} and older: update diffmic")
        if "format" not in meta:  # format 0 (before the record): one description shared by every dataset
            shared = {k: meta.get(k) for k in ("metric", "mode", "num_samples", "scheduler", "sampler",
                                               "epochs_per_trial", "space")}
            meta = {**meta, "format": 0, "datasets": {d: shared for d in meta.get("datasets", [])}}
        return meta

    def read_table(self, name: str) -> pd.DataFrame:
        """A table as written; an empty frame when it is not there (yet)."""
        try:
            return pd.read_parquet(io.BytesIO(self.storage.read_bytes(self.key(f"{name}.parquet"))))
        except FileNotFoundError:
            return pd.DataFrame()

    def read_best(self) -> dict[str, dict]:
        try:
            return json.loads(self.storage.read_text(self.key(BEST_DETAILS)))
        except FileNotFoundError:
            return {}


def best_entry(trial: pd.Series, params: list[str], test: dict, class_names: list[str], checkpoint_uri: str,
               bundle_uri: str | None, sampling: dict | None = None, point: dict | None = None,
               repeats: dict | None = None, model_kind: str = "diffmic", control: dict | None = None,
               val_at_point: dict | None = None, verdict: str = "") -> dict:
    """A dataset's best trial as best.json keeps it: `sampling` is the sampler setting it was tested and exported
    with (None: its own), `point` that setting's validation figures and cost (pareto.csv), `repeats` the mean and
    sd of each validation metric over the finalists' repeats of its configuration, `model_kind` what was exported
    (diffmic | dcg | control), `control` the plain control's figures (control_* columns), `val_at_point` the
    validation figures of the exported model at the exported point (the condition its test figure was taken in;
    `val` is the trial's best epoch with the training sampler), `verdict` the one sentence a search says when a
    control beat the diffusion head."""
    return {"trial_id": trial["trial_id"], "params": {k: trial.get(k) for k in params},
            "val": unprefixed("val", trial.to_dict()), "test": test, "class_names": class_names,
            "checkpoint_uri": checkpoint_uri, "bundle_uri": bundle_uri, "sampling": sampling or {},
            "point": point or {}, "repeats": repeats or {}, "model_kind": model_kind, "control": control or {},
            "val_at_point": val_at_point or {}, "verdict": verdict}


def best_row(dataset: str, entry: dict) -> dict:
    return {"dataset": dataset, "trial_id": entry["trial_id"], "model_kind": entry.get("model_kind", "diffmic"),
            **entry["params"], **prefixed("val", entry["val"]),
            **(entry.get("repeats") or {}), **prefixed("val_at_point", entry.get("val_at_point") or {}),
            **prefixed("test", entry["test"]), **(entry.get("sampling") or {}),
            **(entry.get("point") or {}), **(entry.get("control") or {}),
            "checkpoint_uri": entry["checkpoint_uri"], "bundle_uri": entry["bundle_uri"]}
