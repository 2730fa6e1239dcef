"""diffmic.predict: per-image predictions from an exported bundle (local or s3://), CSV output, uncertainty, round
trip against the in-memory model, and one-line refusals of tampered, incomplete or incompatible bundles."""
import copy
import csv
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.bundle import Bundle, load_bundle
from diffmic.data import eval_transform, load_image
from diffmic.engine import train
from diffmic.predict import main, predict_paths
from diffmic.session import LocalSession

from helpers import TINY, compose

SMALL = TINY + ["deterministic=true", "dataset.num_train=48", "dataset.num_test=8"]


class KeepModel(LocalSession):
    """Also keeps a copy of the final in-memory model (the one the bundle is written from)."""

    def finish(self, result, model, cfg, class_names):
        self.model = copy.deepcopy(model).cpu().eval()
        super().finish(result, model, cfg, class_names)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    session = KeepModel(root / "run")
    train(compose(SMALL), session)
    images = root / "images"
    images.mkdir()
    for i in range(3):  # different sizes and shapes: the bundle's preprocessing crops and resizes them
        pixels = (np.random.default_rng(i).random((40 + 8 * i, 48, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(images / f"img{i}.png")
    return {"bundle": root / "run" / "model", "model": session.model, "images": images,
            "paths": sorted(str(p) for p in images.glob("*.png"))}


@pytest.fixture
def bundle_copy(run, tmp_path):
    return shutil.copytree(run["bundle"], tmp_path / "bundle")


def cli(capsys, *args) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("diffmic.predict: error:")
    return lines[0]


def rehash(bundle_dir) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    manifest["files"] = {n: hashlib.sha256((bundle_dir / n).read_bytes()).hexdigest() for n in manifest["files"]}
    (bundle_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow  # a command line in a fresh process: seconds of imports (make test-fast skips it)
def test_cli_predicts_a_directory_skips_a_corrupt_image_and_writes_csv(run, tmp_path):
    images = shutil.copytree(run["images"], tmp_path / "images")
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out" / "predictions.csv"
    r = subprocess.run([sys.executable, "-m", "diffmic.predict", str(run["bundle"]), str(images), "--output", str(out),
                        "--batch-size", "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    assert "broken.png" in r.stderr and "Traceback" not in r.stderr
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == [str(images / f"img{i}.png") for i in range(3)]
    class_names = load_bundle(run["bundle"]).class_names
    with out.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == ["path", "predicted", "confidence", "entropy", "sample_std",
                                 *(f"prob_{c}" for c in class_names)]
    assert [row["path"] for row in rows] == [str(images / f"img{i}.png") for i in range(3)]
    for row, line in zip(rows, lines):
        probs = [float(row[f"prob_{c}"]) for c in class_names]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == class_names[int(np.argmax(probs))] and float(row["confidence"]) == max(probs)
        assert row["predicted"] in line and f"p={float(row['confidence']):.4f}" in line


def test_several_samples_give_entropy_and_spread(run, capsys):
    bundle = load_bundle(run["bundle"])
    # One epoch leaves the head at its start, r = 0, where every noise draw ends on the prior and the spread is 0
    # (test_gain.py); a head with a non-zero last layer depends on y_T, which is what the spread measures.
    with torch.no_grad():
        torch.nn.init.normal_(bundle.model.denoiser.out.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    rows, failures = predict_paths(bundle, run["paths"], num_samples=3, seed=1)
    assert not failures and len(rows) == 3
    for row in rows:
        assert sum(row[f"prob_{c}"] for c in bundle.class_names) == pytest.approx(1.0, abs=1e-5)
        assert 0 < row["entropy"] <= np.log(len(bundle.class_names)) + 1e-6
        assert row["sample_std"] > 0
    code, out, err = cli(capsys, run["bundle"], *run["paths"], "--samples", "3", "--seed", "1")
    assert code == 2 and "--keep-temperature" in one_error_line(err)  # τ was fitted at S = 1 (issue 22)
    code, out, err = cli(capsys, run["bundle"], *run["paths"], "--samples", "3", "--seed", "1", "--keep-temperature")
    assert code == 0, err
    assert len(out.splitlines()) == 3 and all(f"std {row['sample_std']:.4f}" in line
                                              for row, line in zip(rows, out.splitlines()))


def test_round_trip_bundle_predicts_what_the_in_memory_model_predicted(run):
    bundle = load_bundle(run["bundle"])
    settings = dict(sampler="ddim", steps=5, eta=0.0, num_samples=2)
    rows, _ = predict_paths(bundle, run["paths"], **settings, batch_size=8, device="cpu", seed=7)
    # The in-memory model, called directly on the same preprocessed images with the same seed.
    pre = bundle.meta["preprocessing"]
    transform = eval_transform(pre["image_size"], pre["mean"], pre["std"])
    x = torch.stack([transform(load_image(p)) for p in run["paths"]])
    assert bundle.temperature != 1.0  # fitted on validation when the run was trained
    expected = run["model"].predict(x, "ddim", 5, 0.0, 2, torch.Generator().manual_seed(7), bundle.temperature)
    got = torch.tensor([[row[f"prob_{c}"] for c in bundle.class_names] for row in rows])
    torch.testing.assert_close(got, expected.probs, rtol=0, atol=0)
    torch.testing.assert_close(torch.tensor([r["sample_std"] for r in rows]), expected.sample_std, rtol=0, atol=0)
    # And the whole predict path on the in-memory model gives the same rows as on the loaded bundle.
    in_memory = Bundle(run["model"], bundle.config, bundle.meta)
    assert predict_paths(in_memory, run["paths"], **settings, batch_size=8, device="cpu", seed=7)[0] == rows


def test_csv_cells_cannot_become_spreadsheet_formulas(tmp_path):
    from diffmic.predict import write_csv

    names = ['=HYPERLINK("http://x","y")', "benign"]
    row = {"path": "@evil.png", "predicted": names[0], "confidence": 0.9, "entropy": 0.1, "sample_std": -0.0,
           f"prob_{names[0]}": 0.9, "prob_benign": 0.1}
    write_csv(str(tmp_path / "p.csv"), [row], names)
    header, values = list(csv.reader((tmp_path / "p.csv").open()))
    assert header[5] == "prob_" + names[0]  # the formula is not at the cell's start there
    assert values[0] == "'@evil.png" and values[1] == "'" + names[0] and values[2] == "0.9" and values[4] == "-0.0"


def test_tampered_weights_are_refused_before_predicting(bundle_copy, run, capsys):
    weights = bundle_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, out, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and out == ""
    assert "model.safetensors" in one_error_line(err)


def test_missing_file_in_bundle_is_named(bundle_copy, run, capsys):
    (bundle_copy / "config.json").unlink()
    code, out, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and out == ""
    assert "config.json is missing" in one_error_line(err)


@pytest.mark.parametrize("name", ["../../../../../etc/hostname", "/etc/hostname", "extra.json"])
def test_a_manifest_naming_any_other_file_is_refused_before_reading_it(bundle_copy, run, capsys, name):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(b"whatever").hexdigest()
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    code, out, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and out == ""
    assert "not a bundle file" in one_error_line(err)


def test_a_linked_or_oversized_bundle_file_is_refused(bundle_copy, run, capsys, tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_bytes((bundle_copy / "config.json").read_bytes())
    (bundle_copy / "config.json").unlink()
    (bundle_copy / "config.json").symlink_to(outside)
    code, _, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and "config.json is missing (or a link" in one_error_line(err)
    (bundle_copy / "config.json").unlink()
    (bundle_copy / "config.json").write_text(" " * (5 << 20) + "{}")
    rehash(bundle_copy)
    code, _, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and "config.json is 5242882 bytes" in one_error_line(err)


def test_incompatible_manifest_format_is_refused(bundle_copy, run, capsys):
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    (bundle_copy / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    code, out, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and out == ""
    assert "format 99" in one_error_line(err)


def test_bundle_from_another_major_version_is_refused(bundle_copy, run, capsys):
    meta = json.loads((bundle_copy / "bundle.json").read_text())
    meta["versions"]["diffmic"] = "99.0.0"
    (bundle_copy / "bundle.json").write_text(json.dumps(meta))
    rehash(bundle_copy)  # a genuine bundle from another version, not a tampered one
    code, out, err = cli(capsys, bundle_copy, run["images"])
    assert code == 2 and out == ""
    assert "diffmic 99.0.0" in one_error_line(err) and "incompatible" in err


def test_bad_arguments_exit_2(run, tmp_path, capsys):
    code, _, err = cli(capsys, tmp_path / "nowhere", run["images"])
    assert code == 2 and "nowhere" in one_error_line(err)
    code, _, err = cli(capsys, run["bundle"], run["images"], "--steps", "5000")
    assert code == 2 and "--steps 5000" in one_error_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = cli(capsys, run["bundle"], tmp_path / "empty")
    assert code == 2 and "no images" in one_error_line(err)


@pytest.mark.integration
def test_predict_from_s3(run, s3_server, s3_bucket, tmp_path, monkeypatch, capsys):
    client = s3_server.client()
    for f in run["bundle"].iterdir():
        client.upload_file(str(f), s3_bucket, f"best/synthetic/{f.name}")
    monkeypatch.setenv("DIFFMIC_CACHE", str(tmp_path / "cache"))
    code, out, err = cli(capsys, f"s3://{s3_bucket}/best/synthetic", run["images"], "--output", tmp_path / "p.csv")
    assert code == 0, err
    rows, _ = predict_paths(load_bundle(run["bundle"]), run["paths"])
    with (tmp_path / "p.csv").open() as f:
        remote = list(csv.DictReader(f))
    assert [r["predicted"] for r in remote] == [r["predicted"] for r in rows] and len(out.splitlines()) == 3
    assert any((tmp_path / "cache").rglob("model.safetensors"))


def test_one_chain_leaves_the_spread_empty_and_says_why(run, capsys):
    """Issue 22: S = 1 has no spread; a 0 would read as certainty."""
    bundle = load_bundle(run["bundle"])
    rows, _ = predict_paths(bundle, run["paths"], num_samples=1)
    assert all(row["sample_std"] is None for row in rows)
    code, out, err = cli(capsys, run["bundle"], *run["paths"], "--samples", "1")
    assert code == 0 and "sample_std is left empty" in err and "std " not in out
