"""Log set-up shared by every command: human lines by default, one JSON object per line with
`--log-format json` (for journald/Loki/jq). Events that matter carry their fields in `extra=`
under the key `event`, so the JSON form keeps them as fields, not only as text. Event names
are snake_case; docs/events.md lists every one (tests/test_events_doc.py keeps it complete)."""

from __future__ import annotations

import json
import logging
import sys
import time

# Attributes every LogRecord has; anything else came in through `extra=`.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


# Third-party loggers that can see secrets at DEBUG: pyroute2 logs whole netlink messages, and a
# WireGuard GET_DEVICE reply holds the private key (WGDEVICE_A_PRIVATE_KEY) and every peer's
# preshared key; a UAPI dump has `private_key=` and `preshared_key=` lines.
_SECRET_MARKERS = ("PRIVATE_KEY", "PRESHARED_KEY", "private_key", "preshared_key")
REDACTED = "(log record withheld: it may hold a WireGuard secret)"


class WithholdSecrets(logging.Filter):
    """Replaces a library's log record that names a secret key field by a fixed line: the
    field names are what we can know of the secret, so the whole message goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "wgpunch" or record.name.startswith("wgpunch."):
            return True  # ours never format keys but as public keys (keys.py redacts)
        text = record.getMessage()
        if any(marker in text for marker in _SECRET_MARKERS):
            record.msg, record.args, record.exc_info, record.exc_text = REDACTED, (), None, None
        return True


def setup(verbosity: int, fmt: str, *, daemon: bool = False,
          debug_libraries: bool = False) -> None:
    """Daemons log their events (INFO) by default; one-shot commands only warnings. `-v`/`-vv`
    raise wgpunch's own loggers; libraries (aiohttp, pyroute2, dnspython, asyncio) stay at
    WARNING unless `debug_libraries` (pyroute2 then at most INFO), and even then a record
    naming a secret key field is withheld."""
    verbosity += 1 if daemon else 0
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    handler.addFilter(WithholdSecrets())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if debug_libraries else max(level, logging.WARNING))
    logging.getLogger("wgpunch").setLevel(level)
    # pyroute2's DEBUG lines are whole netlink messages: never below INFO (wg/netlink.py caps
    # it so on import too, for programs that use wgpunch without this set-up).
    logging.getLogger("pyroute2").setLevel(max(root.level, logging.INFO))
    # aiohttp logs every request at INFO; that is the access log, not our events.
    logging.getLogger("aiohttp.access").setLevel(max(level, logging.WARNING))
