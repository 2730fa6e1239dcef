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


def _import_graph() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports, at the top or inside functions alike (an import
    placed in a function to dodge Python's circle check is still a circle in the design)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    mods = {}
    for pkg in ("diffmic", "tune"):
        for f in (root / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(root).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = f

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t)
                if r and r != m and not m.startswith(r + "."):
                    graph[m].add(r)
    return graph


def test_no_import_circle_anywhere():
    """Issue 23: no module reaches itself through imports, those inside functions included."""
    graph, circles = _import_graph(), []

    def reach(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo += graph[m]
        return seen

    circles = sorted(m for m in graph if m in reach(m))
    assert not circles, f"modules on an import circle: {circles}"


def test_library_modules_leave_sys_path_alone():
    """Only the old command scripts (tune/<command>.py, run as files) put the checkout on sys.path, and only when run."""
    root = Path(__file__).resolve().parents[1]
    for f in [*(root / "diffmic").rglob("*.py"), *(root / "tune").rglob("*.py")]:
        text = f.read_text()
        if "sys.path.insert" in text:
            assert f.parent == root / "tune" and text.index('if __name__ == "__main__":') < text.index("sys.path"), f


def test_the_package_list_names_every_package():
    """pyproject.toml lists the packages (configs/ is mapped in as diffmic.configs): a new sub-package must be added."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for pkg in ("diffmic", "tune")
             for p in (root / pkg).rglob("__init__.py")}
    assert found | {"diffmic.configs"} == listed


def test_the_command_lines_check_their_input_before_importing_torch_ray_or_sklearn():
    """What runs before a bad value is answered (config composition and checks, the search's plan up to its checks)
    imports none of the heavy libraries: a typo costs a user about a second, not the seconds of importing them."""
    code = ("import sys\n"
            "import diffmic.cli, diffmic.config, diffmic.train, tune.cli.search, tune.study.plan, tune.study.checks\n"
            "print(sorted(m for m in ('torch', 'ray', 'sklearn', 'timm', 'pandas', 'boto3') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
    r = subprocess.run([sys.executable, "-m", "diffmic.train", "train.lrr=1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, env={**__import__("os").environ, "PYTHONPROFILEIMPORTTIME": "1"})
    assert "did you mean train.lr?" in r.stderr
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert not imported & {"torch", "ray", "sklearn", "timm"}, sorted(imported & {"torch", "ray", "sklearn", "timm"})
