"""Experiment tracking for a search: TensorBoard event files per trial (on by default) and, with tracking=mlflow,
a run per trial on an MLflow tracking server.

    <root>/<experiment>/tensorboard/<dataset>/<trial>/   a trial's event files: every numeric train_*/val_* metric
                                                         (and lr) per epoch, and its searched parameters (HParams);
                                                         `tensorboard --logdir <root>/<experiment>` shows them all
    MLflow experiment <experiment>                       a run per dataset (the chosen model, its test metrics, the
        a run per trial, nested under it                 report) and a run per trial (searched parameters by name,
                                                         per-epoch metrics, status, its best checkpoint's URI)

Both are Tune callbacks in the driver. Ray pickles them into tuner.pkl with the RunConfig and unpickles them when a
search resumes, so they keep names and URIs only; writers and clients are made on first use, never pickled. Tracking
never costs the search: a failing write is one warning line for the trial, which is then not tracked further. What is
logged is chosen item by item, never in bulk: no config, no environment, and every text is redacted (diffmic.secrets).
"""
from __future__ import annotations

import math
import numbers
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

from ray import tune

from diffmic.remote import cache_dir
from diffmic.secrets import redact, redact_url

PER_EPOCH = ("train_", "val_", "lr")  # the result keys (prefixes) tracked each epoch
FINAL_STATUS = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}  # Tune's trial status -> MLflow's; others: KILLED
# MLflow's client retries a request for about 4 minutes by default. In Tune's loop that would hold every trial's
# reporting while the server is down; unless the user set these, a request gives up after 2 retries (seconds).
CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}

# The trackers Tune is calling in this driver, per (experiment URI, dataset): finish() closes what they hold open.
# Tune calls the unpickled copies when a search resumes, so they are found here, not kept from callbacks().
_LIVE: dict[tuple[str, str], dict[type, TrialTracker]] = {}
_LOCK = threading.Lock()  # the datasets' searches run in threads of one driver


def callbacks(search) -> list[tune.Callback]:
    """The Tune callbacks that track a dataset's search (search: tune.study.runner.DatasetSearch)."""
    t = search.cfg["tracking"]
    return ([TensorBoardTracker(search)] if t["tensorboard"] else []) + \
        ([MlflowTracker(search)] if t["name"] == "mlflow" else [])


def finish(search, summary, best: dict | None, report_uri: str | None) -> None:
    """Once a dataset's search has its results: each trial's best checkpoint, the chosen model and the report to
    MLflow; TensorBoard files closed (and uploaded to S3). Never raises: a failure is one warning line."""
    try:
        with _LOCK:
            live = _LIVE.pop((search.record.uri, search.dataset), {})
        trackers = [live.get(type(fresh), fresh) for fresh in callbacks(search)]
    except Exception as e:  # noqa: BLE001 - tracking never fails the search
        warn(search.dataset, describe(e))
        return
    for tracker in trackers:
        try:
            tracker.ready()
            tracker.finish(search, summary, best, report_uri)
        except Exception as e:  # noqa: BLE001
            warn(search.dataset, f"{tracker.sink}: {describe(e)}")


def warn(dataset: str, message: str) -> None:
    print(f"[search] {dataset}: tracking: {message}", flush=True)


def describe(e: BaseException) -> str:
    lines = redact(redact_url(str(e))).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def text(value) -> str:
    return redact(redact_url(str(value)))


def epoch_metrics(result: dict) -> tuple[int | None, dict[str, float]]:
    """(epoch, the finite numeric per-epoch metrics) of a Tune result; Ray's own keys (time, iteration…) left out."""
    epoch = result.get("epoch")
    metrics = {k: float(v) for k, v in result.items() if k.startswith(PER_EPOCH) and isinstance(v, numbers.Real)
               and not isinstance(v, bool) and math.isfinite(v)}
    return (int(epoch) if isinstance(epoch, numbers.Real) else None), metrics


class TrialTracker(tune.Callback):
    """What both trackers share: plain fields only in a pickle, runtime state on first use, a warning per trial."""
    sink = ""

    def __init__(self, search) -> None:
        self.dataset, self.experiment_uri = search.dataset, search.record.uri
        self.params = {p.key: p.name for p in search.params}  # trial.config holds the sampled values by config key

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def ready(self) -> None:
        if "_last" not in self.__dict__:
            self._last: dict[str, int] = {}  # trial -> last epoch tracked: a restored trial re-reports its last one
            self._failed: set[str] = set()
            self.open()

    def open(self) -> None:
        """The tracker's own runtime state."""

    def searched(self, trial) -> dict:
        return {name: trial.config.get(key) for key, name in self.params.items()}

    def guard(self, trial_id: str, action) -> None:
        self.ready()
        with _LOCK:
            _LIVE.setdefault((self.experiment_uri, self.dataset), {})[type(self)] = self
        if trial_id in self._failed:
            return
        try:
            action()
        except Exception as e:  # noqa: BLE001 - tracking never fails the search
            self._failed.add(trial_id)
            warn(self.dataset, f"{self.sink}, trial {trial_id}: {describe(e)}; the trial is not tracked further")

    def new_epoch(self, trial_id: str, result: dict) -> tuple[int, dict] | None:
        epoch, metrics = epoch_metrics(result)
        if epoch is None or not metrics or epoch <= self._last.get(trial_id, 0):
            return None
        self._last[trial_id] = epoch
        return epoch, metrics

    def finish(self, search, summary, best: dict | None, report_uri: str | None) -> None:
        raise NotImplementedError


class TensorBoardTracker(TrialTracker):
    sink = "TensorBoard"

    def __init__(self, search) -> None:
        super().__init__(search)
        self.storage, self.key = search.storage, search.record.key("tensorboard", search.dataset)

    def local_dir(self) -> Path:
        """In the storage root itself; for S3, a staging directory of this node (computed here: a new head has its
        own cache), uploaded at each trial's end, so that nothing waits on S3 during a trial."""
        if not self.storage.is_s3:
            return Path(self.storage.join(self.key))
        return cache_dir("tensorboard") / self.storage.join(self.key).replace("://", "_").replace("/", "_")

    def open(self) -> None:
        self._writers, self._tags = {}, {}

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.guard(trial.trial_id, lambda: self.log(trial.trial_id, result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.guard(trial.trial_id, lambda: self.close(trial))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.guard(trial.trial_id, lambda: self.close(trial))

    def on_experiment_end(self, trials, **info) -> None:
        for trial in trials:
            if trial.trial_id in self.__dict__.get("_writers", {}):
                self.guard(trial.trial_id, lambda: self.close(trial))

    def log(self, trial_id: str, result: dict) -> None:
        new = self.new_epoch(trial_id, result)
        if new is None:
            return
        epoch, metrics = new
        if trial_id not in self._writers:
            from tensorboardX import SummaryWriter
            self._writers[trial_id] = SummaryWriter(logdir=str(self.local_dir() / trial_id), flush_secs=30)
        for name, value in metrics.items():
            self._writers[trial_id].add_scalar(name, value, epoch)
        self._tags.setdefault(trial_id, set()).update(metrics)

    def close(self, trial) -> None:
        """The trial's searched values for TensorBoard's HParams dashboard (its metrics are the run's own scalars),
        then the file closed and, for S3, uploaded."""
        from tensorboardX.summary import hparams

        writer = self._writers.pop(trial.trial_id, None)
        if writer is None:
            return
        values = {k: v if isinstance(v, (bool, numbers.Real)) else text(v) for k, v in self.searched(trial).items()}
        for summary in hparams(values, dict.fromkeys(sorted(self._tags.pop(trial.trial_id, ())), 0.0)):
            writer.file_writer.add_summary(summary)
        writer.close()
        if self.storage.is_s3:
            self.storage.upload_dir(self.local_dir() / trial.trial_id, f"{self.key}/{trial.trial_id}")

    def finish(self, search, summary, best: dict | None, report_uri: str | None) -> None:
        for writer in self._writers.values():  # trials Tune never ended (an interrupted search)
            writer.close()
        self._writers.clear()
        if self.storage.is_s3 and self.local_dir().is_dir():
            self.storage.upload_dir(self.local_dir(), self.key)
            shutil.rmtree(self.local_dir(), ignore_errors=True)


class MlflowTracker(TrialTracker):
    """A run per trial, nested under a run per (experiment, dataset), found again by tags when a search resumes.
    MlflowClient only: the datasets' searches run in threads of one driver, and mlflow's module state is global."""
    sink = "MLflow"

    def __init__(self, search) -> None:
        super().__init__(search)
        t = search.cfg["tracking"]
        self.uri, self.experiment_name = t["uri"], t.get("experiment_name") or search.experiment
        self.metric, self.epochs = search.cfg["search"]["metric"], search.cfg["train"]["epochs"]
        self.record = text(self.experiment_uri)

    def open(self) -> None:
        self._client = self._experiment_id = self._parent_id = None
        self._runs: dict[str, str] = {}  # trial -> its open run

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.guard(trial.trial_id, lambda: self.run(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.guard(trial.trial_id, lambda: self.log(trial, result))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self.guard(trial.trial_id, lambda: self.end(trial, "FINISHED"))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self.guard(trial.trial_id, lambda: self.end(trial, "FAILED"))

    def on_experiment_end(self, trials, **info) -> None:
        for trial in trials:  # still open: the search ended (or was interrupted) before the trial did
            if trial.trial_id in self.__dict__.get("_runs", {}):
                self.guard(trial.trial_id, lambda: self.end(trial, "KILLED"))

    # ------------------------------------------------------------ the server
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            for var, value in CLIENT_ENV.items():
                os.environ.setdefault(var, value)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def experiment_id(self) -> str:
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            client = self.client()
            experiment = client.get_experiment_by_name(self.experiment_name)
            if experiment is None:
                try:
                    self._experiment_id = client.create_experiment(self.experiment_name)
                except MlflowException:  # another dataset's search made it just now
                    experiment = client.get_experiment_by_name(self.experiment_name)
                    if experiment is None:
                        raise
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    client.restore_experiment(experiment.experiment_id)
                self._experiment_id = experiment.experiment_id
        return self._experiment_id

    def find(self, role: str, **tags: str) -> list:
        """This search's runs of a role ('search' or 'trial') with the given tags."""
        where = " AND ".join(f"tags.{k} = '{v}'" for k, v in {"role": role, "dataset": self.dataset, **tags}.items())
        runs, token = [], None
        while True:
            page = self.client().search_runs([self.experiment_id()], where, max_results=1000, page_token=token)
            runs += [r for r in page if r.data.tags.get("record") == self.record]
            token = page.token
            if not token:
                return runs

    def reopen(self, run) -> str:
        if run.info.status != "RUNNING":
            self.client().update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id

    def parent_id(self) -> str:
        if self._parent_id is None:
            found = self.find("search")
            self._parent_id = self.reopen(found[0]) if found else self.client().create_run(
                self.experiment_id(), run_name=self.dataset,
                tags={"role": "search", "dataset": self.dataset, "record": self.record}).info.run_id
        return self._parent_id

    # ------------------------------------------------------------ a trial
    def run(self, trial) -> str:
        """The trial's run: a new one, or (a resumed search) its earlier one, continued after its last epoch."""
        from mlflow.entities import Param

        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        client, parent = self.client(), self.parent_id()
        found = self.find("trial", trial_id=tid)
        if found:
            run_id = self.reopen(found[0])
            metrics = found[0].data.metrics
            key = self.metric if self.metric in metrics else next(iter(metrics), None)
            steps = [m.step for m in client.get_metric_history(run_id, key)] if key else []
            self._last[tid] = max([self._last.get(tid, 0), *steps])
        else:
            run_id = client.create_run(self.experiment_id(), run_name=f"{self.dataset}-{tid}", tags={
                "role": "trial", "dataset": self.dataset, "record": self.record, "trial_id": tid,
                "mlflow.parentRunId": parent}).info.run_id
            params = {**self.searched(trial), "dataset": self.dataset}
            client.log_batch(run_id, params=[Param(name, text(value)) for name, value in params.items()])
        self._runs[tid] = run_id
        return run_id

    def log(self, trial, result: dict) -> None:
        from mlflow.entities import Metric

        run_id = self.run(trial)
        new = self.new_epoch(trial.trial_id, result)
        if new is not None:
            epoch, metrics = new
            now = int(time.time() * 1000)
            self.client().log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in metrics.items()])

    def end(self, trial, status: str) -> None:
        run_id = self._runs.pop(trial.trial_id, None)
        if run_id is None:  # never started here (a trial stopped while pending)
            return
        epoch = (trial.last_result or {}).get("epoch")
        if status == "FINISHED" and isinstance(epoch, numbers.Real) and epoch < self.epochs:
            self.client().set_tag(run_id, "stopped_early", "true")  # by ASHA (or the time budget)
        self.client().set_terminated(run_id, status)

    # ------------------------------------------------------------ the results
    def finish(self, search, summary, best: dict | None, report_uri: str | None) -> None:
        from mlflow.entities import Metric, RunTag

        client, parent = self.client(), self.parent_id()
        runs = {r.data.tags.get("trial_id"): r for r in self.find("trial")}
        for row in summary.to_dict("records"):
            run = runs.get(str(row["trial_id"]))
            if run is None or row.get("dataset", self.dataset) != self.dataset:
                continue
            checkpoint = row.get("checkpoint_path")
            if isinstance(checkpoint, str) and checkpoint:
                client.set_tag(run.info.run_id, "best_checkpoint_uri", text(search.storage.uri_of(checkpoint)))
            if run.info.status == "RUNNING":  # its end was never seen (a driver lost after the trial finished)
                client.set_terminated(run.info.run_id, FINAL_STATUS.get(row.get("status"), "KILLED"))
        if best:
            tags = {"best_trial_id": best.get("trial_id"), "best_checkpoint_uri": best.get("checkpoint_uri"),
                    "best_bundle_uri": best.get("bundle_uri")}
            test = {f"test_{k}": float(v) for k, v in (best.get("test") or {}).items()
                    if isinstance(v, numbers.Real) and not isinstance(v, bool)}
            now = int(time.time() * 1000)
            client.log_batch(parent, metrics=[Metric(k, v, now, 0) for k, v in test.items()],
                             tags=[RunTag(k, text(v)) for k, v in tags.items() if v is not None])
            if str(best.get("trial_id")) in runs:
                client.set_tag(runs[str(best["trial_id"])].info.run_id, "best", "true")
        if report_uri:
            with tempfile.TemporaryDirectory() as tmp:
                report = Path(tmp, "report.html")
                report.write_bytes(search.storage.read_bytes(search.record.key("report.html")))
                client.log_artifact(parent, str(report))
        client.set_terminated(parent, "FINISHED")
