"""What the command-line entry points share: the Hydra config directory and one-line errors for bad input."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("DIFFMIC_CONFIG_DIR", Path(__file__).resolve().parents[1] / "configs"))


def project_errors() -> tuple[type[BaseException], ...]:
    """The project's own bad-input exceptions (config, data, storage, bundle): their message is the whole story."""
    from diffmic.bundle import BundleError
    from diffmic.config import ConfigError
    from diffmic.data import DataError
    from diffmic.weights import WeightsError
    errors: list[type[BaseException]] = [ConfigError, DataError, BundleError, WeightsError]
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
    except (ValueError, FileNotFoundError, *project_errors()) as e:
        if os.environ.get("DIFFMIC_DEBUG"):
            raise
        message = " ".join(str(e).split())
        if not isinstance(e, project_errors()):  # bad input caught deeper down, or a bug: keep the way to its trace
            message += " (DIFFMIC_DEBUG=1 shows the traceback)"
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
