"""What the command-line entry points share: the config directory and one-line errors for bad input."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

from diffmic.compat import ensure_torchvision_importable
from diffmic.errors import DiffmicError
from diffmic.secrets import redact

CONFIG_DIR = Path(os.environ.get("DIFFMIC_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


@contextmanager
def one_line_errors(program: str):
    """Print `program: error: …` and exit 2 on bad input; DIFFMIC_DEBUG=1 shows the traceback instead.

    Every command line starts here, so this is also where the process gets the torchvision fix (diffmic.compat)."""
    ensure_torchvision_importable()
    try:
        yield
    except (ValueError, FileNotFoundError, DiffmicError) as e:
        if os.environ.get("DIFFMIC_DEBUG"):
            raise
        message = " ".join(str(e).split())
        if not isinstance(e, DiffmicError):  # bad input caught deeper down, or a bug: keep the way to its trace
            message += " (DIFFMIC_DEBUG=1 shows the traceback)"
        print(f"{program}: error: {redact(message)}", file=sys.stderr)
        sys.exit(2)


def to_plain(cfg) -> dict:
    """An OmegaConf config as a resolved plain dict (what the engine, Ray and Tune are given)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
