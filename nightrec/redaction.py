"""Secrets out of anything we print, log or store: URIs lose their password and their token-like query values.

A tracking URI such as ``postgresql://user:password@db/mlflow`` or an artifact URI signed with ``?sig=...`` is
configuration, and configuration ends up in Prefect artifacts, MLflow tags and terminals that others can read.
"""

from __future__ import annotations

import re

MASK = "***"
# Query parameters whose value is a credential (compared case-insensitively, also as a suffix: X-Amz-Signature).
SECRET_PARAMETERS = (
    "password",
    "passwd",
    "pwd",
    "secret",
    "token",
    "key",
    "sig",
    "signature",
    "credential",
    "credentials",
    "auth",
    "authorization",
    "session",
)

# scheme://userinfo@ : everything up to the last '@' before the path (a raw '@' in a password stays hidden).
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^\s/?#]*)@")
_QUERY_PAIR = re.compile(r"(?P<lead>[?&;])(?P<name>[^=&;#\s]+)=(?P<value>[^&;#\s]*)")


def _secret_name(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return any(lowered.endswith(p) for p in SECRET_PARAMETERS)


def redact(text: str) -> str:
    """``text`` with every URI's user and password replaced by ``***`` and token-like query values masked.

    Works on a bare URI and on free text holding URIs (an exception message, a markdown report)."""

    def userinfo(match: re.Match) -> str:
        return f"{match['scheme']}{MASK}@"

    def pair(match: re.Match) -> str:
        if not _secret_name(match["name"]) or not match["value"]:
            return match.group()
        return f"{match['lead']}{match['name']}={MASK}"

    return _QUERY_PAIR.sub(pair, _USERINFO.sub(userinfo, str(text)))
