"""The server's API keys: one from --api-key, or several from a key file, each with a name that
the logs show instead of the key. The file is read again when it changes, so a key is revoked
by deleting its line, without a restart.

Key file: one key a line, `NAME KEY` or a bare `KEY` (named `key-<line>`); blank lines and lines
starting with `#` are skipped."""
from __future__ import annotations

import hmac
import os
import threading
from pathlib import Path


class KeyFileError(ValueError):
    pass


def parse_keys(text: str) -> dict[str, str]:
    """key → name."""
    keys: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise KeyFileError(f"line {lineno}: expected `NAME KEY` or `KEY`, got {len(parts)} fields")
        name, key = (parts if len(parts) == 2 else (f"key-{lineno}", parts[0]))
        if key in keys:
            raise KeyFileError(f"line {lineno}: the key of {name!r} is also {keys[key]!r}'s")
        keys[key] = name
    if not keys:
        raise KeyFileError("the file is empty: no key in it (one a line: `NAME KEY` or `KEY`)")
    return keys


class KeyRing:
    """Which key, if any, a bearer token is; `name_of` answers its name or None."""

    def __init__(self, key: str | None = None, path: Path | None = None):
        if (key is None) == (path is None):
            raise ValueError("a KeyRing holds one --api-key or one key file")
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._keys = {key: "api-key"} if key is not None else self._read()

    def _read(self) -> dict[str, str]:
        try:
            st = os.stat(self.path)
            keys = parse_keys(self.path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise KeyFileError(f"cannot read it ({e})") from None
        self._stamp = (st.st_mtime_ns, st.st_size)
        return keys

    def _current(self) -> dict[str, str]:
        if self.path is None:
            return self._keys
        try:
            st = os.stat(self.path)
        except OSError:  # the file is gone: no key is valid any more
            self._keys, self._stamp = {}, None
            return self._keys
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            with self._lock:
                try:
                    self._keys = self._read()
                except KeyFileError:
                    pass  # caught half written: the last good keys stay until it reads again
        return self._keys

    def name_of(self, token: bytes | str) -> str | None:
        """The key's name, comparing in constant time against every key. Compared as bytes, the
        key's UTF-8 against the header's raw bytes: a header value is not text (Starlette decodes
        it as Latin-1), so a key with non-ASCII characters would otherwise never match."""
        if isinstance(token, str):
            token = token.encode("utf-8", "surrogateescape")
        found = None
        for key, name in self._current().items():
            if hmac.compare_digest(token, key.encode("utf-8", "surrogateescape")):
                found = name
        return found

    def __len__(self) -> int:
        return len(self._current())
