"""The shape of the code: the core stands alone, modules stay small."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY, compose

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATION = ("tune", "ray", "hydra", "omegaconf", "boto3", "botocore")


def test_the_core_imports_no_orchestration_code():
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(ORCHESTRATION[:2] + ORCHESTRATION[4:])})\b")
    top_level = re.compile(r"^(from|import)\s+(hydra|omegaconf)\b")  # the command lines compose configs in main()
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}" for path in sorted((ROOT / "diffmic").rglob("*.py"))
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.match(line) or top_level.match(line)]
    assert not hits, hits


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in ("diffmic", "tune") for p in (ROOT / folder).rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 400}


@pytest.mark.slow  # one short training in a fresh process
def test_the_core_trains_evaluates_and_predicts_with_orchestration_blocked(tmp_path):
    """Train from a plain config dict, evaluate the checkpoint, load the bundle and predict from local files, in a
    process where importing any of Ray, Hydra, OmegaConf, boto3, botocore or tune/ fails."""
    (tmp_path / "config.json").write_text(json.dumps(compose([*TINY, "model.dcg.pretrained=false"])))
    (tmp_path / "img").mkdir()
    from PIL import Image
    Image.new("RGB", (50, 40), (200, 30, 30)).save(tmp_path / "img" / "a.png")
    script = f"""
import json, runpy, sys
for name in {ORCHESTRATION!r}:
    sys.modules[name] = None  # any import of these now raises ImportError
from diffmic.compat import ensure_torchvision_importable
ensure_torchvision_importable()
from diffmic.engine import train
from diffmic.session import LocalSession
cfg = json.load(open("{tmp_path}/config.json"))
result = train(cfg, LocalSession("{tmp_path}/run"))
from diffmic.evaluate import main as evaluate
evaluate(["checkpoint={tmp_path}/run", "split=val", "output={tmp_path}/val.json"])
sys.argv = ["diffmic.predict", "{tmp_path}/run/model", "{tmp_path}/img", "--output", "{tmp_path}/p.csv"]
runpy.run_module("diffmic.predict", run_name="__main__")
"""
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    run_val = json.loads((tmp_path / "run" / "metrics.json").read_text())["val"]
    assert json.loads((tmp_path / "val.json").read_text())["accuracy"] == run_val["accuracy"]
    assert "a.png" in (tmp_path / "p.csv").read_text()
