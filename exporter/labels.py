"""Label values from untrusted input: bounded, printable, valid UTF-8, still distinct.

Usage:
    safe_label('llama"\\n' * 5000, max_chars=128)  # short, no control characters, hash-suffixed
"""

from __future__ import annotations

import functools
import hashlib
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


@functools.lru_cache(maxsize=4096)
def safe_label(value: str, max_chars: int) -> str:
    """Return `value` fit for a label: control characters and lone surrogates replaced by U+FFFD,
    and cut to `max_chars`. Any value changed so gets a hash of the whole value as a suffix, so
    that two names that differ only in what was replaced or cut stay two series. Quotes and
    backslashes are left to the exposition's escaping.
    """
    clean = value.encode("utf-8", "replace").decode("utf-8")
    clean = _CONTROL.sub("\ufffd", clean)
    if clean == value and len(clean) <= max_chars:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{clean[: max_chars - 14]}~{digest}"
