"""Credentials out of what the pipeline writes down: manifests embed the config, and a config may hold
URLs with a password (`s3://key:secret@bucket/...`, `https://user:token@host/...`) or a token in a
query string (`?token=...`, `X-Amz-Signature=...`). `redact` returns a copy with those replaced by
`***`; everything else is kept as it was, so a manifest still says what was read."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
_SECRET_PARAM = re.compile(
    r"(?P<name>[?&;](?:[A-Za-z0-9_-]*(?:token|secret|password|passwd|signature|credential|key|sig|auth)"
    r"[A-Za-z0-9_-]*))=(?P<value>[^&;#\s]*)",
    re.IGNORECASE,
)


def redact_text(text: str) -> str:
    """`text` with URL user info (`user:password@`) and secret-looking query values replaced."""
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['name']}={REDACTED}", text)


def redact(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with every string passed through `redact_text`;
    dictionary entries whose key names a secret (`password`, `token`, `secret`, ...) are replaced whole."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: REDACTED if isinstance(k, str) and _secret_key(k) and value[k] not in (None, "")
                else redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def _secret_key(key: str) -> bool:
    return bool(re.search(r"password|passwd|secret|token|credential|api_key|access_key", key, re.IGNORECASE))
