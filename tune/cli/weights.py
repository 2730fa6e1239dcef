"""`python -m tune.weights fetch NAME --to DIR|FILE|s3://bucket/prefix/`: write a backbone's hub weights as a
safetensors file, on a machine with model-hub access, for clusters without it (then `model.dcg.weights=…`).

    python -m tune.weights fetch resnet50.tv_in1k --to s3://my-bucket/weights/
    python tune/search.py … model.dcg.weights=s3://my-bucket/weights/resnet50.tv_in1k.safetensors
"""

from __future__ import annotations
import argparse
import tempfile
from pathlib import Path
from diffmic.cli import one_line_errors
from diffmic.weights import PAPER_DCG_BACKBONE, write_hub_weights




def fetch(name: str, to: str) -> str:
    """The URI of the written file: `to` is a directory (or prefix) to hold NAME.safetensors, or a .safetensors name."""
    if not to.startswith("s3://"):
        return str(write_hub_weights(name, Path(to).expanduser()))
    from tune.storage import open_storage
    file_name = to.rstrip("/").rsplit("/", 1)[-1] if to.endswith(".safetensors") else f"{name}.safetensors"
    prefix = to[: -len(file_name)] if to.endswith(".safetensors") else to
    storage = open_storage(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        local = write_hub_weights(name, Path(tmp) / file_name)
        storage.write_bytes(file_name, local.read_bytes())
    return storage.join(file_name)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m tune.weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="write a backbone's hub weights to a file (local or s3://)")
    f.add_argument("name", nargs="?", default=PAPER_DCG_BACKBONE,
                   help=f"timm model name with its weights tag (default: {PAPER_DCG_BACKBONE}, the paper's DCG)")
    f.add_argument("--to", required=True, help="a directory, a .safetensors file or an s3:// prefix")
    args = p.parse_args()
    with one_line_errors("tune.weights"):
        print(fetch(args.name, args.to))
