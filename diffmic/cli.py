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


def check_overrides(config_name: str, overrides: list[str], program: str) -> None:
    """Compose the config once before Hydra runs the command, so that a mistyped key, an unknown config group
    option or a malformed override is one line naming it (and the nearest valid one), not Hydra's page of text."""
    import difflib
    import re

    from hydra import compose, initialize_config_dir

    from diffmic.config import dotted_keys
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    task = [o for o in overrides if not o.startswith(("-", "hydra.", "hydra/"))]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR), job_name=program):
        try:
            compose(config_name, overrides=task)
            return
        except (HydraException, OmegaConfBaseException) as e:
            text = " ".join(str(e).split())
            try:  # the keys to suggest from: the config with the given group choices (dataset=folder has no num_train)
                base = compose(config_name, overrides=[o for o in task if "." not in o.split("=")[0]])
            except (HydraException, OmegaConfBaseException):
                base = compose(config_name)
            base = OmegaConf.to_container(base, resolve=False)
    if m := re.search(r"Could not override '([^']+)'", text):
        key = m.group(1)
        near = difflib.get_close_matches(key, list(dotted_keys(base)), n=1)
        message = f"{key}: no such key in the config" + (f"; did you mean {near[0]}?" if near else "")
    elif m := re.search(r"Could not find '([^'/]+)/([^']+)' Available options in '[^']+': (.*?) Config search", text):
        group, option, options = m.groups()
        near = difflib.get_close_matches(option, options.split(), n=1)
        message = (f"{group}={option}: no such {group}; expected one of {', '.join(options.split())}"
                   + (f" (did you mean {near[0]}?)" if near else ""))
    else:
        message = text.split(" See https://")[0]
    print(f"{program}: error: {redact(message)}", file=sys.stderr)
    sys.exit(2)
