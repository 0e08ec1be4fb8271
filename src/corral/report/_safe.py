"""Making agent-written text harmless to show. Command lines, DNS names, SNI and alert messages come
from the agent, which may write anything: a terminal escape sequence (`ESC [` ... can recolour,
move the cursor, retitle the window, or on some terminals answer back), a carriage return that
overwrites the line before it, or a bidirectional override that makes `exe.sh` read as `hs.exe`.
Each such character is shown as its escape (`\\x1b`, `\\u202e`), visibly, never interpreted."""

from __future__ import annotations

import re

# C0 controls and DEL, C1 controls, zero-width and bidirectional formatting characters, line and
# paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(s: str) -> str:
    """`s` with every control and invisible formatting character shown as its escape."""
    return _UNSAFE.sub(_escape, s)
