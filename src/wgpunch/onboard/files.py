"""Files that hold or name private keys, written so that they are either whole or absent:
each is staged beside its target (mode 0600 from the first byte) and put in place by one
rename, after everything that could fail has been done; or dropped."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from ..errors import ConfigError


class Staged:
    """`text` written next to `path`, not yet in its place. `new`: `path` must not exist (it
    is checked now, and again when committing: an existing file is never replaced)."""

    def __init__(self, path: Path, text: str, *, new: bool, layer: str) -> None:
        self.path, self.new, self.layer = path, new, layer
        if new and path.exists():
            raise ConfigError(f"{layer}: {path} exists; remove it or choose another file")
        self.tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            self.discard()
            raise ConfigError(f"{layer}: cannot write {path}: {error.strerror}") from None

    def commit(self) -> None:
        try:
            if self.new:
                os.link(self.tmp, self.path)  # fails rather than replace a file made meanwhile
                os.unlink(self.tmp)
            else:
                os.replace(self.tmp, self.path)
        except OSError as error:
            self.discard()
            raise ConfigError(f"{self.layer}: cannot write {self.path}: {error.strerror}") \
                from None

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def write_new(path: Path, text: str, layer: str) -> None:
    """A new 0600 file, whole or not at all; an existing one is an error, never replaced."""
    Staged(path, text, new=True, layer=layer).commit()


def read_text(path: Path, layer: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = getattr(error, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"{layer}: cannot read {path}: {reason}") from None
