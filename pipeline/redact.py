"""Passwords out of URLs before they are shown: stderr, status and error texts, files, MQTT.

`rtsp://user:secret@host/x` is shown as `rtsp://user:***@host/x` (the user name stays: it
tells which account was used). One rule for every URL framecast prints: source URIs, broker
URLs, and messages of libraries (FFmpeg, PyAV) that repeat the URL they were given.
"""

from __future__ import annotations

import re

#: scheme://user:password@ (the password runs to the last `@` before a `/` or white space)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:'\"]*):(?P<pw>[^\s/'\"]*)@")
HIDDEN = "***"


def redact_text(text: str) -> str:
    """`text` with the password of every URL in it replaced by `***` (cheap when none is there)."""
    if "@" not in text or "://" not in text:
        return text
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{HIDDEN}@", text)


def redact_url(url: str) -> str:
    """One URL, safe to print and log."""
    return redact_text(url)
