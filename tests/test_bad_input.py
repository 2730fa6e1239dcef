"""The bad-input catalogue: what a careless or hostile user types into the command lines, and the one line each gets.

Each case runs the command as a user would (a fresh process) and expects exit code 2 and exactly one line
`PROGRAM: error: …` on stderr containing the given text, before any training, cluster or storage work. Add a row
when a new way in is found.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import TINY, compose

ROOT = Path(__file__).resolve().parents[1]
TRAIN, EVALUATE, PREDICT = ["-m", "diffmic.train"], ["-m", "diffmic.evaluate"], ["-m", "diffmic.predict"]
SEARCH, REPORT = ["tune/search.py"], ["tune/report.py"]
TINY_CLI = [*TINY, "model.dcg.pretrained=false"]
TINY_FOLDER = [o for o in TINY_CLI if not o.startswith(("dataset.num_train", "dataset.num_test"))]  # synthetic's keys


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (checkpoint and bundle), for the cases that need one."""
    from diffmic.engine import train
    from diffmic.session import LocalSession

    run = tmp_path_factory.mktemp("catalogue") / "run"
    train(compose(TINY_CLI), LocalSession(run))
    return run


def single_class(tmp: Path) -> str:
    for split, n in (("train", 6), ("test", 2)):
        (tmp / "one" / split / "a").mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 40), (i * 30, 0, 0)).save(tmp / "one" / split / "a" / f"{i}.png")
    return str(tmp / "one")


def corrupt_pixels(tmp: Path) -> str:
    """A folder dataset whose one PNG has valid chunk checksums around pixel data that fails to inflate."""
    import struct
    import zlib

    for split, names in (("train", ("a", "b")), ("test", ("a", "b"))):
        for c in names:
            (tmp / "bad" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 40), (i * 40, 80 if c == "a" else 160, 0)).save(tmp / "bad" / split / c / f"{i}.png")
    target = tmp / "bad" / "train" / "a" / "0.png"
    data = bytearray(target.read_bytes())
    at = data.index(b"IDAT")
    length = struct.unpack(">I", data[at - 4:at])[0]
    payload = bytes(b ^ 0x5A for b in data[at + 4:at + 4 + length])  # garbage inside a well-formed chunk
    data[at + 4:at + 4 + length] = payload
    data[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + payload) & 0xFFFFFFFF)
    target.write_bytes(bytes(data))
    return str(tmp / "bad")


def existing_run(tmp: Path) -> str:
    (tmp / "old").mkdir()
    (tmp / "old" / "metrics.json").write_text("{}")
    return str(tmp / "old")


def truncated_state(tmp: Path, trained: Path) -> str:
    run = tmp / "cut"
    (run / "checkpoint").mkdir(parents=True)
    state = (trained / "checkpoint" / "state.pt").read_bytes()
    (run / "checkpoint" / "state.pt").write_bytes(state[: len(state) // 2])
    return str(run)


def misfit_bundle(tmp: Path, trained: Path) -> str:
    """A genuine-looking bundle (hashes match) whose class list does not fit its weights."""
    import hashlib
    import shutil

    bundle = Path(shutil.copytree(trained / "model", tmp / "misfit"))
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["class_names"] = [*meta["class_names"], "extra"]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return str(bundle)


def images(tmp: Path) -> str:
    (tmp / "img").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp / "img" / "x.png")
    return str(tmp / "img")


class Payload:
    """What a hostile weights file would carry: unpickling it would run code."""

    def __reduce__(self):
        return (print, ("payload ran",))


def weights_file(tmp: Path, kind: str) -> str:
    """Issue 24's weights files: another architecture's, a corrupt safetensors, pickle payloads, a text file."""
    import pickle

    import torch
    if kind == "other":
        import timm
        path = tmp / "resnet18.pth"
        torch.save(timm.create_model("resnet18", num_classes=0).state_dict(), path)
    elif kind == "corrupt":
        path = tmp / "bad.safetensors"
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(64))
    elif kind == "torch-payload":
        path = tmp / "payload.pth"
        torch.save({"w": Payload()}, path)
    elif kind == "pickle-payload":
        path = tmp / "plain.pth"
        path.write_bytes(pickle.dumps({"w": Payload()}))
    else:
        path = tmp / "notes.pth"
        path.write_text("these are not weights\n")
    return str(path)


def weights_case(kind: str):
    return lambda t: [*TINY_CLI[:-1], "model.dcg.pretrained=true", f"model.dcg.weights={weights_file(t, kind)}",
                      f"output_dir={t}/run"]


def rehashed(bundle: Path) -> None:
    import hashlib
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = {n: hashlib.sha256((bundle / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def huge_denoiser_bundle(tmp: Path, trained: Path) -> str:
    import shutil
    bundle = Path(shutil.copytree(trained / "model", tmp / "huge"))
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["model"]["denoiser"]["feature_dim"] = 1_000_000_000
    (bundle / "config.json").write_text(json.dumps(cfg))
    rehashed(bundle)
    return str(bundle)


def huge_manifest_bundle(tmp: Path, trained: Path) -> str:
    import shutil
    bundle = Path(shutil.copytree(trained / "model", tmp / "bigmanifest"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["padding"] = "x" * (5 << 20)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    return str(bundle)


def pickled_checkpoint(tmp: Path) -> str:
    import torch
    (tmp / "evil" / "checkpoint").mkdir(parents=True)
    torch.save({"epoch": 1, "model": Payload(), "config": {}}, tmp / "evil" / "checkpoint" / "state.pt")
    return str(tmp / "evil")


def edited_rungs(tmp: Path) -> str:
    """An experiment whose state/synthetic.json holds ASHA rungs that are not numbers (edited by hand)."""
    (tmp / "res" / "e" / "state").mkdir(parents=True)
    (tmp / "res" / "e" / "state" / "synthetic.json").write_text(json.dumps({"asha": [[{"t1": "abc"}]]}))
    return str(tmp / "res")


def a_file(tmp: Path) -> str:
    (tmp / "afile").write_text("x")
    return str(tmp / "afile")


# name: (program, arguments (callables get tmp_path, or tmp_path and the trained run), text the line must contain)
CATALOGUE = {
    "mistyped config key": (TRAIN, ["train.lrr=1e-3"], "train.lrr: no such key in the config; did you mean train.lr?"),
    "a key of another dataset": (TRAIN, ["dataset=folder", "dataset.num_train=5"], "dataset.num_train: no such key"),
    "unknown dataset": (TRAIN, ["dataset=imagenet"], "dataset=imagenet: no such dataset; expected one of"),
    "override without a value": (TRAIN, ["seed"], "Error parsing override 'seed'"),
    "sampler start beyond the chain": (TRAIN, ["diffusion.sample_steps=5000"], "diffusion.sample_steps=5000"),
    "single class": (TRAIN, lambda t: ["dataset=folder", f"dataset.root={single_class(t)}", *TINY_FOLDER,
                                       f"output_dir={t}/run"], "1 class ('a'); expected at least 2"),
    "pixel data corrupt inside valid chunks": (
        TRAIN, lambda t: ["dataset=folder", f"dataset.root={corrupt_pixels(t)}", *TINY_FOLDER, f"output_dir={t}/run"],
        "corrupt or unreadable image"),
    "train into an existing run": (TRAIN, lambda t: [*TINY_CLI, f"output_dir={existing_run(t)}"],
                                   "already holds a run (metrics.json)"),
    "resume with nothing to resume": (TRAIN, lambda t: [*TINY_CLI, f"output_dir={t}/none", "resume=true"],
                                      "resume=true: no checkpoint to resume"),
    "path as experiment name": (TRAIN, ["scaling.num_workers=1", "experiment=/abs/path"], "experiment='/abs/path'"),
    "evaluate flag instead of key=value": (EVALUATE, lambda t, r: [f"checkpoint={r}", "--split", "val"],
                                           "unexpected argument '--split'"),
    "evaluate mistyped key": (EVALUATE, lambda t, r: [f"checkpoint={r}", "diffusion.sampel_steps=5"],
                              "did you mean diffusion.sample_steps?"),
    "truncated state.pt": (EVALUATE, lambda t, r: [f"checkpoint={truncated_state(t, r)}"], "cannot be loaded"),
    "bundle whose classes do not fit its weights": (PREDICT, lambda t, r: [misfit_bundle(t, r), images(t)],
                                                    "weights do not fit"),
    "empty search space": (SEARCH, ["search.space={}"], "does not empty the space"),
    "search: mistyped key": (SEARCH, ["search.num_sample=2"], "did you mean search.num_samples?"),
    "report port out of range": (REPORT, lambda t: [str(t), "--port", "99999"], "--port 99999: expected 0"),
    # issue 24
    "weights of another architecture": (TRAIN, weights_case("other"), "do not fit 'test_resnet'"),
    "corrupt safetensors weights": (TRAIN, weights_case("corrupt"), "bad.safetensors' cannot be read"),
    "torch.save'd pickle payload as weights": (TRAIN, weights_case("torch-payload"), "payload.pth' cannot be read"),
    "plain pickle payload as weights": (TRAIN, weights_case("pickle-payload"), "plain.pth' cannot be read"),
    "a text file as weights": (TRAIN, weights_case("text"), "notes.pth' cannot be read"),
    "explain into a path under a file": (PREDICT, lambda t, r: [str(r / "model"), images(t), "--explain",
                                                                f"{a_file(t)}/sub"], "exists and is not a directory"),
    "output onto a directory": (PREDICT, lambda t, r: [str(r / "model"), images(t), "--output", str(t)],
                                "is a directory (expected a CSV file"),
    "a bundle asking for a huge denoiser": (PREDICT, lambda t, r: [huge_denoiser_bundle(t, r), images(t)],
                                            "model.denoiser.feature_dim=1000000000: expected an integer in 1..65536"),
    "a bundle with a huge manifest": (PREDICT, lambda t, r: [huge_manifest_bundle(t, r), images(t)],
                                      "manifest.json is 52"),
    "evaluate a checkpoint holding a pickle payload": (EVALUATE, lambda t: [f"checkpoint={pickled_checkpoint(t)}"],
                                                       "cannot be loaded"),
    "search: a synthetic key in a folder search": (
        SEARCH, lambda t: ["datasets=[folder]", f"dataset.root={t}", "dataset.num_train=96"],
        "dataset.num_train: no such key"),
    "search: per-dataset key for a dataset not searched": (
        SEARCH, ["datasets=[synthetic]", "datasets.pkl.dataset.train_list=x.pkl"], "'pkl' is not searched"),
    "search: optuna storage without its driver": (
        SEARCH, ["search.optuna_storage=postgresql://u:SECRETPW@127.0.0.1/db"], "search.optuna_storage=postgresql://u:"),
    "search: max_cost_ms with no sampler point": (SEARCH, ["search.max_cost_ms=10", "search.pareto=[]"],
                                                  "search.max_cost_ms=10: expected null when search.pareto=[]"),
    "search: tensorboard not a boolean": (SEARCH, ["tracking.tensorboard=maybe"], "tracking.tensorboard='maybe'"),
    "search: tracking URI with a bad scheme": (SEARCH, ["tracking=mlflow", "tracking.uri=htp:/nohost"],
                                               "tracking.uri=htp:/nohost: expected an MLflow tracking URI"),
    "search: tracking URI without a scheme": (SEARCH, ["tracking=mlflow", "tracking.uri=127.0.0.1:5000"],
                                              "tracking.uri=127.0.0.1:5000: expected an MLflow tracking URI"),
    "search: edited ASHA rungs in the state file": (
        SEARCH, lambda t: [*TINY_CLI, f"storage.uri={edited_rungs(t)}", "experiment=e"], 'asha=[[{"t1": "abc"}]]'),
    # the README's commands for the pkl and csv lists: their keys reach their dataset (the root is what is wrong)
    "search: pkl list key reaches the pkl dataset": (
        SEARCH, lambda t: ["datasets=[pkl]", f"dataset.root={t}/none", "dataset.train_list=x_train.pkl"],
        "dataset pkl"),
    "search: csv key reaches the csv dataset": (
        SEARCH, lambda t: ["datasets=[csv]", f"dataset.root={t}/none", "dataset.train_csv=mine.csv"], "dataset csv"),
    "search: per-dataset key": (
        SEARCH, lambda t: ["datasets=[synthetic,csv]", f"roots.csv={t}/none", "datasets.csv.dataset.train_csv=m.csv"],
        "dataset csv"),
}


@pytest.mark.slow  # a fresh process per case (seconds of imports each)
@pytest.mark.parametrize("case", list(CATALOGUE))
def test_bad_input_is_one_line(case, tmp_path, request):
    program, args, expected = CATALOGUE[case]
    if callable(args):
        needs_run = args.__code__.co_argcount == 2
        args = args(tmp_path, request.getfixturevalue("trained")) if needs_run else args(tmp_path)
    r = subprocess.run([sys.executable, *program, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and ": error: " in lines[0] and expected in lines[0], r.stderr[-2000:]
    assert "SECRETPW" not in r.stderr + r.stdout and "payload ran" not in r.stderr + r.stdout
    if case == "train into an existing run":
        assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["metrics.json"]
    if case in ("single class", "pixel data corrupt inside valid chunks", "resume with nothing to resume"):
        assert not (tmp_path / "run").exists() and not (tmp_path / "none").exists()  # nothing written
