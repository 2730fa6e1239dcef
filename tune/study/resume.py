"""What a search needs to continue on a new head node, kept in the experiment record each time Tune saves its own
state: a copy of the Optuna study, ASHA's rungs, and a keyed digest of every file of Ray's state that a restore
unpickles.

The trust boundary: `Tuner.restore` unpickles `tuner.pkl` and the controller's, searcher's and callbacks' state from
the experiment directory, so whoever can write to the results bucket could run code on the driver, which holds the
credentials. Each such file is restored only when its HMAC, keyed with a secret that is not in the bucket, is one this
project recorded when Ray wrote it (`verify_ray_state`, before `Tuner.restore`). The key: $DIFFMIC_SIGNING_KEY, else
one derived from $AWS_SECRET_ACCESS_KEY (every node of an S3 cluster has it), else a key file made on first use
(~/.config/diffmic/signing.key: local storage lives on this machine anyway).

No Ray here: the checks run before Ray is imported. The scheduler and the callback that Tune calls to keep this state
are in tune/study/resume_hooks.py.
"""
from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import os
import sqlite3
import tempfile
from pathlib import Path

from diffmic.remote import cache_dir
from tune.study.space import SearchError
from tune.storage import Storage

KEY_ENV = "DIFFMIC_SIGNING_KEY"
KEY_FILE = Path("~/.config/diffmic/signing.key")
KEPT_DIGESTS = 50  # per file name: Ray uploads its state asynchronously, so the stored copy may be a few saves old


def study_path(rel: str) -> Path:
    """A study's SQLite file on this node. Only `rel` is kept in what Ray pickles: a new head may have another cache
    directory ($DIFFMIC_CACHE), and its driver must use its own copy of the study, not a path of the lost head."""
    return cache_dir("optuna") / rel


def is_ray_state(name: str) -> bool:
    """The files at the root of a Tune experiment that a restore reads and unpickles (`tuner.pkl`; the controller's
    `experiment_state-*.json` holds pickled trials; searcher, search generator and callback states)."""
    return "/" not in name and name.endswith((".pkl", ".json"))


def signing_key() -> tuple[bytes, str]:
    """(key, where it comes from); the key itself is never written anywhere but the key file."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV].encode(), f"${KEY_ENV}"
    if os.environ.get("AWS_SECRET_ACCESS_KEY"):
        secret = os.environ["AWS_SECRET_ACCESS_KEY"].encode()
        return hmac.new(secret, b"diffmic: Ray state of a search", hashlib.sha256).digest(), "$AWS_SECRET_ACCESS_KEY"
    path = KEY_FILE.expanduser()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32))
    return path.read_bytes(), str(KEY_FILE)


def digest(key: bytes, data: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def read_state(storage: Storage, key: str) -> dict:
    if not storage.exists(key):
        return {}
    try:
        state = json.loads(storage.read_text(key))
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def verify_ray_state(storage: Storage, exp_rel: str, state_key: str, trust: bool) -> None:
    """Before `Tuner.restore` (and before Ray starts): every file of Ray's state under `exp_rel` must carry a digest
    this project recorded. One line naming the first that does not, unless the user trusts the stored state. ASHA's
    saved rungs are checked too (they are read back into the scheduler, signed or not)."""
    state = read_state(storage, state_key)
    check_rungs(state.get("asha"), storage.join(state_key))
    if trust or not storage.exists(f"{exp_rel}/tuner.pkl"):
        return
    signed = state.get("signed") if isinstance(state.get("signed"), dict) else {}
    key, source = signing_key()
    for rel in storage.list(exp_rel):
        name = rel[len(exp_rel) + 1:]
        if not is_ray_state(name):
            continue
        known = signed.get(name) if isinstance(signed.get(name), list) else []
        if digest(key, storage.read_bytes(rel)) in known:
            continue
        if not known:
            why = "no signature was recorded for it"
        elif state.get("key_source") != source:
            why = f"it was signed with the key from {state.get('key_source')}, this node has the key from {source}"
        else:
            why = "it changed after the search wrote it, or the key changed"
        raise SearchError(f"refusing to resume {storage.join(exp_rel)}: {name} is not as this project's search "
                          f"wrote it ({why}), and Ray would unpickle it. Resume only results you wrote: give the "
                          f"search the key it ran with (${KEY_ENV}), pass trust_ray_state=true if you wrote these "
                          f"files yourself, or start a new experiment name")


def check_rungs(value, where: str) -> None:
    """`asha` in state/<dataset>.json: null, or per bracket a list of rungs, each {trial id: finite number}."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    ok = value is None or (isinstance(value, list) and all(
        isinstance(bracket, list) and all(isinstance(rung, dict) and all(
            isinstance(t, str) and number(v) for t, v in rung.items()) for rung in bracket) for bracket in value))
    if not ok:
        raise SearchError(f"{where}: asha={json.dumps(value)[:80]}: expected ASHA's saved rungs (per bracket a list "
                          "of {trial id: number}) or null; the file was edited or damaged: restore it or delete the "
                          "key to resume with empty rungs")


def snapshot(db: Path) -> bytes:
    """A consistent copy of a SQLite file that Optuna may be writing (SQLite's backup API, not a byte copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "study.db"
        with contextlib.closing(sqlite3.connect(db)) as source, contextlib.closing(sqlite3.connect(copy)) as target:
            source.backup(target)
        return copy.read_bytes()
