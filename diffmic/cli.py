"""What the command-line entry points share: the config directory, one-line errors for bad input, progress."""
from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager

from diffmic.defaults import CONFIG_DIR  # noqa: F401  (the commands' config directory; defaults.py owns it)
from diffmic.errors import DiffmicError
from diffmic.secrets import redact


@contextmanager
def one_line_errors(program: str):
    """Print `program: error: …` and exit 2 on bad input; DIFFMIC_DEBUG=1 shows the traceback instead.

    (The torchvision fix of diffmic.compat is applied where timm is first imported, not here: a command that stops on
    bad input imports neither torch nor timm.)"""
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


# Hydra's own command-line flags that take a value (`--cfg job`, `-p model`): neither is an override
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--info", "-i", "--experimental-rerun")


def task_overrides(args: list[str]) -> list[str]:
    """The overrides among a command line's arguments: Hydra's flags, their values and hydra.* keys dropped."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in HYDRA_VALUE_FLAGS:
            skip = True
        elif not a.startswith(("-", "hydra.", "hydra/")):
            out.append(a)
    return out


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

    task = task_overrides(overrides)
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


class Progress:
    """Progress over `total` items on stderr, never stdout (whose lines are the results): tqdm's bar with its ETA on
    a terminal when there are more than `min_total` items; otherwise (a job's log) a plain line at most every `every`
    seconds, so that a short run adds nothing to the log and a long one a few lines."""

    def __init__(self, total: int, unit: str, program: str, min_total: int = 0, every: float = 30.0):
        self.total, self.unit, self.program, self.every = total, unit, program, every
        self.done, self.start = 0, time.monotonic()
        self.last = self.start
        use_bar = sys.stderr.isatty() and total > min_total
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True) if use_bar else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            from tqdm import tqdm
            line = tqdm.format_meter(self.done, self.total, now - self.start, unit=self.unit,
                                     bar_format="{n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}, {rate_fmt}]")
            print(f"{self.program}: {line}", file=sys.stderr, flush=True)

    def echo(self, line: str, file=None) -> None:
        """A line on `file` (stdout by default) that the bar, if any, moves out of the way of."""
        file = file or sys.stdout
        (self.bar.write if self.bar is not None else print)(line, file=file)
        file.flush()  # a reader of the pipe sees each prediction as it is made

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
