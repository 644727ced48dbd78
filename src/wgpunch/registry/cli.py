"""`wgpunch registry`: options from flags and a TOML file (flags win), then serve until a
signal. Every mistake in either is a `ConfigError`: one line, no traceback."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import signal
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from ..wg import open_device
from ..wg.device import Endpoint
from . import ConfigError
from .api import create_app
from .listen import DEFAULT_PORT, default_listen, is_wildcard, parse_listen
from .observer import Observer
from .state import RegistryState
from .timings import Timings

log = logging.getLogger(__name__)

# Bounds on --poll-interval: below 10 ms the reads cost more than they tell; above a minute
# the registry is no help in getting peers connected quickly.
POLL_MIN_S, POLL_MAX_S = 0.01, 60.0
CONFIG_KEYS = ("interface", "listen", "token_file", "poll_interval")

EPILOG = f"""\
config file (--config FILE, TOML): the same options as the flags; a flag wins over the file.
  interface = "wg0"                      # like --interface
  listen = ["10.99.0.254:{DEFAULT_PORT}"]         # like --listen (a list, or one string)
  token_file = "/etc/wgpunch/token"      # like --token-file (relative: to the config file)
  poll_interval = 0.2                    # like --poll-interval

The API (docs/api.md) identifies each caller by its tunnel source address: it must lie in
the allowed IPs of exactly one peer of IF. Stop with SIGTERM or SIGINT (exit status 0).
"""


@dataclass(frozen=True, slots=True)
class Settings:
    interface: str
    listen: tuple[Endpoint, ...]  # empty: the interface's own addresses
    token_file: Path | None
    poll_interval_s: float


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "registry",
        help="run the registry: publish peers' observed endpoints to nodes",
        description=(
            "Serve the wgpunch registry API for WireGuard interface IF. Every node is an\n"
            "ordinary peer of IF; the registry publishes the endpoint IF observes for each\n"
            "of them, plus what nodes report about themselves, over HTTP inside the tunnel,\n"
            "with a watch stream and punch coordination."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--interface", "-i", metavar="IF",
        help="the registry's WireGuard interface, whose peers are the nodes (required, here "
             "or in the config file)",
    )
    parser.add_argument(
        "--listen", metavar="ADDR:PORT", action="append",
        help=f"listen for the API on ADDR:PORT ([IPv6]:PORT; a bare ADDR means port "
             f"{DEFAULT_PORT}); repeat for several. Default: every IP address of IF, port "
             f"{DEFAULT_PORT}. 0.0.0.0 or [::] only when given explicitly (logs a warning)",
    )
    parser.add_argument(
        "--config", metavar="FILE", type=Path,
        help="read options from this TOML file (keys below); flags win",
    )
    parser.add_argument(
        "--token-file", metavar="FILE", type=Path,
        help="also require 'Authorization: Bearer TOKEN' on every request but /healthz; "
             "TOKEN is this file's content without surrounding whitespace",
    )
    parser.add_argument(
        "--poll-interval", metavar="SECONDS", type=float,
        help="how often to read IF for peers' endpoints (default 0.2; "
             f"{POLL_MIN_S}-{POLL_MAX_S:.0f})",
    )
    parser.set_defaults(func=run, daemon=True)


# -- options ----------------------------------------------------------------------------------


def load_config(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            config = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"registry: cannot read config {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"registry: config {str(path)!r} is not valid TOML: {exc}") from None
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"registry: config {str(path)!r}: unknown key {unknown[0]!r}; "
                          f"known: {', '.join(CONFIG_KEYS)}")
    return config


def _config_value(config: Mapping[str, Any], key: str, kinds: tuple[type, ...],
                  what: str) -> Any:
    value = config.get(key)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        raise ConfigError(f"registry: config key {key!r} must be {what}, got {value!r}")
    return value


def settings_from(args: argparse.Namespace) -> Settings:
    config: dict[str, Any] = {} if args.config is None else load_config(args.config)
    base = Path(".") if args.config is None else args.config.parent

    interface = args.interface or _config_value(config, "interface", (str,), "text")
    if not interface:
        raise ConfigError("registry: no interface: give --interface IF or 'interface' in "
                          "the config file")

    listen_texts = args.listen
    if listen_texts is None:
        value = _config_value(config, "listen", (str, list), "an address or a list")
        listen_texts = [value] if isinstance(value, str) else value or []
        if not all(isinstance(text, str) for text in listen_texts):
            raise ConfigError("registry: config key 'listen' must list addresses as text")
    listen = tuple(dict.fromkeys(parse_listen(text) for text in listen_texts))

    token_file = args.token_file
    if token_file is None:
        value = _config_value(config, "token_file", (str,), "a file name")
        token_file = None if value is None else base / value

    poll = args.poll_interval
    if poll is None:
        poll = _config_value(config, "poll_interval", (int, float), "a number of seconds")
    poll = 0.2 if poll is None else float(poll)
    if math.isnan(poll) or not POLL_MIN_S <= poll <= POLL_MAX_S:
        raise ConfigError(f"registry: poll interval {poll} s is not in "
                          f"{POLL_MIN_S}-{POLL_MAX_S:.0f} s")
    return Settings(interface, listen, token_file, poll)


def read_token(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or "not UTF-8 text"
        raise ConfigError(f"registry: cannot read token file {str(path)!r}: {reason}") from None
    token = text.strip()
    if not token or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"registry: token file {str(path)!r} must hold one token "
                          "(printable, no spaces)")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by other users (chmod 600 it)", path)
    return token


# -- serving ----------------------------------------------------------------------------------


async def serve(settings: Settings, timings: Timings | None = None) -> None:
    """Run the registry until SIGTERM or SIGINT, then release everything."""
    timings = timings or Timings(poll_interval_s=settings.poll_interval_s)
    token = None if settings.token_file is None else read_token(settings.token_file)
    listen = list(settings.listen) or await default_listen(settings.interface)
    state = RegistryState(punch_window_s=timings.punch_coalesce_s)
    observer = Observer(lambda: open_device(settings.interface), state, timings)
    app = create_app(state, timings=timings, observer=observer, token=token)
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True,
                           access_log=None, shutdown_timeout=timings.shutdown_grace_s)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    caught: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        caught.append(sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await runner.setup()
        for endpoint in listen:
            if is_wildcard(endpoint):
                log.warning("listening on every address (%s): the API is reachable from "
                            "outside the tunnel; only peers' tunnel addresses are served",
                            endpoint)
            try:
                await web.TCPSite(runner, str(endpoint.ip), endpoint.port).start()
            except OSError as exc:
                raise ConfigError(f"registry: cannot listen on {endpoint}: "
                                  f"{exc.strerror or exc}") from None
        log.info("registry for %s serving on %s, epoch %s", settings.interface,
                 ", ".join(map(str, listen)), state.epoch,
                 extra={"event": "serving", "listen": [str(e) for e in listen]})
        await stop.wait()
        log.info("stopping on %s", caught[0], extra={"event": "stopping"})
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await runner.cleanup()


def run(args: argparse.Namespace) -> int:
    asyncio.run(serve(settings_from(args)))
    return 0
