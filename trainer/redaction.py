"""Keeping credentials out of what unimo writes: logs, MLflow params and artifacts, checkpoints, job tables.

Credentials come from the environment (or the cloud's own mechanisms); a user may still paste one into a
config or a URL. One list of words says what looks like a credential, read two ways:
- a config key is secret when its last word is one (`auth_token`, `secret_access_key`), not when it merely
  contains one (`tokenizer`, `pad_token_id` are ordinary settings);
- an environment variable is secret when its name contains one (`AWS_SECRET_ACCESS_KEY`, `RAY_AUTH_TOKEN`).
"""

from __future__ import annotations

import re
from typing import Any

SECRET_WORDS = ("secret", "password", "passwd", "token", "access_key", "secret_key", "credential",
                "credentials", "api_key", "private_key", "session")
_SECRET_KEY = re.compile(r"(^|[_.-])(" + "|".join(SECRET_WORDS) + r")$", re.IGNORECASE)
# A value shorter than this is not scrubbed from text: replacing "1" or "abc" everywhere would garble the
# logs, and no real credential is that short.
MIN_SECRET_LEN = 8


def is_secret_key(key: str) -> bool:
    """A config key that names a credential (its last word is a secret word)."""
    return bool(_SECRET_KEY.search(key))


def is_secret_env_name(name: str) -> bool:
    """An environment variable whose name contains a secret word."""
    upper = name.upper()
    return any(word.upper() in upper for word in SECRET_WORDS)


def secret_values(environ: dict[str, str]) -> list[str]:
    """Values of environment variables that look like credentials (to scrub them from what is logged)."""
    return [v for k, v in environ.items() if is_secret_env_name(k) and len(v) >= MIN_SECRET_LEN]


def redact(text: str, secrets: list[str]) -> str:
    """Removes known secret values, URL user-info (``scheme://user:pass@host``) and URL query strings (a
    presigned or token-bearing URL carries its credential there, e.g.
    ``https://host/shard.tar?X-Amz-Signature=...``)."""
    text = re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)
    text = re.sub(r"(\w+://[^\s?'\"]*)\?[^\s'\"\],]+", r"\1?***", text)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def safe_config(cfg: Any, secrets: list[str]) -> dict:
    """The resolved config tree without keys that name credentials and with secret values redacted."""
    from trainer.config_loader import to_dict

    def clean(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if not is_secret_key(str(k))}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return redact(node, secrets) if isinstance(node, str) else node

    return clean(to_dict(cfg))


def safe_params(cfg: Any, secrets: list[str] | None = None) -> dict[str, str]:
    """The flattened resolved config as MLflow params, minus anything secret."""
    from data_pipeline.accounting import weight_params
    from trainer.config_loader import flatten

    secrets = secrets or []
    params = {k: redact(str(v), secrets)[:6000] for k, v in flatten(safe_config(cfg, secrets)).items()}
    return {**params, **(weight_params(cfg.data) if hasattr(cfg, "data") else {})}

