"""What the command-line entry points share: the Hydra config directory and one-line errors for bad input."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("DIFFMIC_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (config, data, storage, bundle), reported as one line, not a traceback."""
    from diffmic.bundle import BundleError
    from diffmic.config import ConfigError
    from diffmic.data import DataError
    errors: list[type[BaseException]] = [ConfigError, DataError, BundleError, ValueError, FileNotFoundError]
    try:
        from tune.storage import StorageError
        errors.append(StorageError)
    except ImportError:
        pass
    return tuple(errors)


@contextmanager
def one_line_errors(program: str):
    """Print `program: error: …` and exit 2 on bad input; DIFFMIC_DEBUG=1 shows the traceback instead."""
    try:
        yield
    except user_errors() as e:
        if os.environ.get("DIFFMIC_DEBUG"):
            raise
        message = " ".join(str(e).split())
        try:
            from tune.storage import redact
            message = redact(message)
        except ImportError:
            pass
        print(f"{program}: error: {message}", file=sys.stderr)
        sys.exit(2)


def to_plain(cfg) -> dict:
    """An OmegaConf config as a resolved plain dict (what the engine, Ray and Tune are given)."""
    from omegaconf import OmegaConf
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
