"""Credentials out of every URI a person or a store sees: the one rule for logs, messages, saved
configs, MLflow params and tags, and checkpoints.

A URI's whole userinfo (``scheme://userinfo@host``) is replaced by ``***``: a password, a token
given as the user name, and a password with an unencoded ``@`` or ``:`` in it alike (the userinfo
runs to the authority's *last* ``@``, as RFC 3986 parsers read it).
"""

from __future__ import annotations

import re

REDACTED = "***"

# scheme://, then the authority up to its last "@" (no "/", whitespace, quote or "@" after it
# before the authority ends)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s'\"]*@(?=[^/@\s'\"]*(?:[/\s'\"?#]|$))")


def redact_uri(text: str | None) -> str | None:
    """``text`` with the userinfo of every ``scheme://userinfo@host`` in it replaced by ``***``."""
    if text is None:
        return None
    return _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
