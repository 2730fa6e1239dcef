"""One dataset's search as every stage after planning sees it: its composed config, its parameters, and where its
record, its Tune experiment and its Optuna study live."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tune.record.experiment import Record
from tune.storage import Storage
from tune.study.resume import study_path
from tune.study.space import Param


@dataclass
class DatasetSearch:
    dataset: str
    cfg: dict              # the composed config for this dataset (training keys + `search`)
    params: list[Param]
    storage: Storage       # the storage root
    experiment: str

    @property
    def record(self) -> Record:
        return Record(self.storage, self.experiment)

    @property
    def rel(self) -> str:  # the Tune experiment, relative to the storage root
        return self.record.key(self.dataset)

    @property
    def checkpoints_rel(self) -> str:  # where each trial's Ray Train run keeps its checkpoints
        return self.record.key(self.dataset, "checkpoints")

    @property
    def study_rel(self) -> str:  # the study's SQLite file under this node's cache (tune/study/resume.py:study_path)
        return f"{self.storage.uri.replace('://', '_').replace('/', '_')}/{self.experiment}/{self.dataset}.db"

    def optuna_db(self) -> Path:
        """The study's SQLite file, local to the driver (copied into the record as the search goes)."""
        return study_path(self.study_rel)
