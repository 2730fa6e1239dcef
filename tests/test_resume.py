"""What a new head resumes from (tune/study/resume.py): the signatures of Ray's state files, checked before Ray unpickles
them, and ASHA's rungs. Real files in a local storage root and Ray's own ASHA; the search end to end is in
test_search.py (a tampered tuner.pkl, a killed search resumed on an empty cache)."""
from __future__ import annotations

import json
import os
import pickle
import stat
from types import SimpleNamespace

import pytest

from tune.study.resume import KEY_ENV, signing_key, verify_ray_state
from tune.study.resume_hooks import ResumableASHA, SearchState
from tune.study.space import SearchError
from tune.storage import open_storage

EXP, STATE = "e/synthetic", "e/state/synthetic.json"


@pytest.fixture
def staged(tmp_path):
    """A storage root holding an experiment whose Ray state was signed as Tune saved it, and the staging directory."""
    storage = open_storage(str(tmp_path / "root"), check=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    files = {"tuner.pkl": pickle.dumps({"tuner": 1}), "searcher-state-s1.pkl": pickle.dumps({"searcher": 1}),
             "experiment_state-s1.json": b'{"trial_data": []}', "search_gen_state-s1.json": pickle.dumps({})}
    storage.write_bytes(f"{EXP}/tuner.pkl", files["tuner.pkl"])
    state = SearchState(storage, EXP, "e/optuna/synthetic.db", STATE, None, None,
                        SimpleNamespace(staging_dir=str(staging)))
    state.setup()  # signs tuner.pkl as the Tuner wrote it
    for name, data in files.items():
        if name != "tuner.pkl":
            (staging / name).write_bytes(data)
            storage.write_bytes(f"{EXP}/{name}", data)  # what Tune's upload of the staging directory does
    (staging / "trial_dir").mkdir()  # only the files at the experiment's root are Ray's restore state
    state.get_state()
    return storage, staging, state


def test_signed_state_is_restored(staged):
    storage, _, _ = staged
    before = {name: storage.read_bytes(f"{EXP}/{name}") for name in ("tuner.pkl", "searcher-state-s1.pkl")}
    verify_ray_state(storage, EXP, STATE, trust=False)  # raises SearchError on any file it cannot vouch for
    assert {name: storage.read_bytes(f"{EXP}/{name}") for name in before} == before  # and leaves them as they are


@pytest.mark.parametrize("name", ["tuner.pkl", "searcher-state-s1.pkl", "experiment_state-s1.json",
                                  "search_gen_state-s1.json"])
def test_a_replaced_state_file_is_refused(staged, name):
    storage, _, _ = staged
    storage.write_bytes(f"{EXP}/{name}", pickle.dumps("payload"))
    with pytest.raises(SearchError) as e:
        verify_ray_state(storage, EXP, STATE, trust=False)
    message = str(e.value)
    assert f": {name} is not as this project's search wrote it" in message and "\n" not in message
    verify_ray_state(storage, EXP, STATE, trust=True)  # the explicit act


def test_an_added_state_file_or_a_forged_signature_is_refused(staged):
    storage, _, _ = staged
    storage.write_bytes(f"{EXP}/callback-states-s2.pkl", pickle.dumps("payload"))
    with pytest.raises(SearchError, match="callback-states-s2.pkl .*no signature was recorded"):
        verify_ray_state(storage, EXP, STATE, trust=False)
    state = json.loads(storage.read_text(STATE))  # the signatures are in the bucket too, but keyed: a writer of the
    state["signed"]["callback-states-s2.pkl"] = ["0" * 64]  # bucket cannot make one that matches
    storage.write_text(STATE, json.dumps(state))
    with pytest.raises(SearchError, match="callback-states-s2.pkl"):
        verify_ray_state(storage, EXP, STATE, trust=False)


def test_older_versions_stay_valid_and_a_state_file_lost_is_refused(staged):
    """Tune uploads its staging directory asynchronously: the stored copy may be a save or two behind."""
    storage, staging, state = staged
    old = storage.read_bytes(f"{EXP}/searcher-state-s1.pkl")
    (staging / "searcher-state-s1.pkl").write_bytes(pickle.dumps({"searcher": 2}))
    state.get_state()
    verify_ray_state(storage, EXP, STATE, trust=False)  # the older upload still verifies
    assert storage.read_bytes(f"{EXP}/searcher-state-s1.pkl") == old
    storage.write_text(STATE, "{not json")
    with pytest.raises(SearchError, match="no signature was recorded"):
        verify_ray_state(storage, EXP, STATE, trust=False)


def test_another_key_is_named(staged, monkeypatch):
    storage, _, _ = staged
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "abc")
    with pytest.raises(SearchError, match=r"signed with the key from \$DIFFMIC_SIGNING_KEY, this node has the key "
                                          r"from \$AWS_SECRET_ACCESS_KEY"):
        verify_ray_state(storage, EXP, STATE, trust=False)


def test_key_sources_and_the_key_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.setenv(KEY_ENV, "k")
    assert signing_key() == (b"k", "$DIFFMIC_SIGNING_KEY")
    monkeypatch.delenv(KEY_ENV)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    key, source = signing_key()
    assert source == "$AWS_SECRET_ACCESS_KEY" and b"secret" not in key and len(key) == 32
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    key, source = signing_key()
    path = tmp_path / ".config" / "diffmic" / "signing.key"
    assert path.read_bytes() == key and len(key) == 32 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert signing_key() == (key, source)  # made once


def test_the_state_file_holds_no_key(staged):
    storage, _, _ = staged
    text = storage.read_text(STATE)
    assert os.environ[KEY_ENV] not in text and json.loads(text)["key_source"] == "$DIFFMIC_SIGNING_KEY"


def _asha():
    asha = ResumableASHA(time_attr="epoch", metric="m", mode="max", max_t=9, grace_period=1, reduction_factor=3)
    return asha


def _trial(tid: str):
    return SimpleNamespace(trial_id=tid)


def test_asha_rungs_survive_a_restore(tmp_path):
    """The same trial is stopped whether or not the driver was replaced between results."""
    results = [("a", 1, 0.9), ("b", 1, 0.8), ("c", 1, 0.7), ("a", 3, 0.95)]
    late = ("d", 1, 0.1)  # weaker than every trial at the first rung: ASHA stops it

    def run(asha, items):
        actions = []
        for tid, epoch, value in items:
            asha._trial_info.setdefault(tid, asha._brackets[0])  # what on_trial_add does (with one bracket)
            actions.append(asha.on_trial_result(None, _trial(tid), {"epoch": epoch, "m": value}))
        return actions

    uninterrupted = _asha()
    expected = run(uninterrupted, [*results, late])
    assert expected[-1] == "STOP"

    storage = open_storage(str(tmp_path), check=False)
    first = _asha()
    run(first, results)
    SearchState(storage, EXP, "s.db", STATE, None, first, SimpleNamespace(staging_dir=None)).get_state()
    fresh = _asha()  # Tune rebuilds the scheduler as created
    assert run(_asha(), [late]) == ["CONTINUE"]  # without the saved rungs the weak trial would go on
    SearchState(storage, EXP, "s.db", STATE, None, fresh, SimpleNamespace(staging_dir=None)).setup()
    assert fresh.rungs() == first.rungs() and run(fresh, [late]) == expected[-1:]
