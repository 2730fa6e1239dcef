"""The one rule for secrets in text the project prints or writes: the values of the credential variables found in
the environment never appear; they are replaced by '***'."""
from __future__ import annotations

import os
import re
from typing import Any

SECRET_VARS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """`text` with the value of every secret variable set in os.environ replaced by '***'."""
    for var in SECRET_VARS:
        value = os.environ.get(var, "")
        if len(value) >= 4:  # shorter values are no secret, and replacing them would mangle any text
            text = text.replace(value, "***")
    return text


_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^/@\s:]*):[^/@\s]*@")


def redact_url(text: str) -> str:
    """postgresql://user:password@host/db -> postgresql://user:***@host/db."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def redact_config(cfg: Any) -> Any:
    """A copy of a config with every string redacted (URL passwords, secret values): what the project writes into
    checkpoints, config.json and bundles, and hands to Ray. No run needs them: a database URL (search.optuna_storage)
    is used by the driver only, and storage credentials come from the environment."""
    if isinstance(cfg, dict):
        return {k: redact_config(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [redact_config(v) for v in cfg]
    return redact(redact_url(cfg)) if isinstance(cfg, str) else cfg
