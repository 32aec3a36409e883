"""Keep credentials out of configs: a config is logged to MLflow and copied into every checkpoint.

Credentials come from the environment (MLFLOW_TRACKING_USERNAME / _PASSWORD or _TOKEN, WANDB_API_KEY,
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ...), where MLflow, W&B and pyarrow's filesystems read them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opensora_core.errors import ConfigError

# Whole name parts, so `tokenizer`, `max_tokens` or `model_max_length` are not mistaken for secrets.
_SECRET_PARTS = {"password", "passwd", "secret", "token", "apikey", "credential", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("access", "key"), ("secret", "key"), ("private", "key"), ("auth", "token")}
_URL_WITH_USERINFO = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s]*@")

ENVIRONMENT_HINT = (
    "pass credentials through the environment (MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD, "
    "WANDB_API_KEY, AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)"
)


def is_secret_name(key: str) -> bool:
    """True for names such as `api_key`, `wandb_token`, `aws_secret_access_key`, `password`."""
    parts = [p for p in re.split(r"[^a-z0-9]+", key.lower()) if p]
    return bool(_SECRET_PARTS.intersection(parts)) or any(
        pair in _SECRET_PAIRS for pair in zip(parts, parts[1:], strict=False)
    )


def has_password_in_url(value: str) -> bool:
    """`s3://KEY:SECRET@bucket/x` or `http://user:pass@host`: a URL carrying a secret in its user part."""
    if not _URL_WITH_USERINFO.match(value):
        return False
    return ":" in urlsplit(value).netloc.rpartition("@")[0]


def check_no_credentials(cfg: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ConfigError naming the first key that holds a credential (by its name, or a URL's user part)."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            check_no_credentials(value, prefix=f"{name}.")
            continue
        values = value if isinstance(value, (list, tuple)) else (value,)
        if is_secret_name(str(key)) and any(v not in (None, "", False) for v in values):
            raise ConfigError(
                f"{name}: looks like a credential; configs are logged and saved, so {ENVIRONMENT_HINT}"
            )
        for item in values:
            if isinstance(item, str) and has_password_in_url(item):
                raise ConfigError(
                    f"{name}: the URL carries a password ({redact_url(item)}); {ENVIRONMENT_HINT}"
                )


def redact_url(url: str) -> str:
    """The URL with its user part replaced by `***`, for logs and printed reports."""
    if not _URL_WITH_USERINFO.match(url):
        return url
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))
