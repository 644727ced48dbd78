"""The rendezvous server's static key, kept on disk so it survives restarts.

natpunch-go's server makes a new key at every start unless given one on the command line
(where `ps` shows it), so every client breaks on a restart. Here the key lives in a file in
`wg genkey` form (base64, one line, mode 0600), made on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path

from ..errors import WgpunchError
from ..keys import Key, generate_private_key

log = logging.getLogger(__name__)


def load_or_create(path: Path) -> Key:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return _create(path)
    except OSError as error:
        raise WgpunchError(f"rendezvous: cannot read key file {path}: {error.strerror}") from None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("rendezvous: key file %s is readable by others (mode %o); chmod 600 it",
                    path, stat.S_IMODE(mode))
    return Key.parse(text.strip(), what=f"key file {path}", secret=True)


def _create(path: Path) -> Key:
    key = generate_private_key()
    try:
        # Its own directory is made (the default /var/lib/wgpunch), never more: a mistyped
        # path must not leave a tree of directories behind.
        path.parent.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return load_or_create(path)
    except OSError as error:
        raise WgpunchError(
            f"rendezvous: cannot create key file {path}: {error.strerror}"
        ) from None
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(key.base64() + "\n")
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink()
        raise WgpunchError(f"rendezvous: cannot write key file {path}: {error.strerror}") from None
    log.info("rendezvous: made a new key in %s", path)
    return key
