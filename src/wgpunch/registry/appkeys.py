"""What the API application holds, under aiohttp's typed keys: made by api.create_app, read
by the middlewares (middleware.py), the handlers (api.py, relayroute.py) and the site that
admits connections (site.py)."""

from __future__ import annotations

from aiohttp import web

from ..keys import Key
from .auth import Identities
from .clientlog import ClientLog
from .connlimit import ConnectionTable
from .limits import Limits
from .metrics import RegistryMetrics
from .observer import Observer
from .ratelimit import RateLimiter
from .state import RegistryState
from .stream import Stream
from .timings import Timings

STATE = web.AppKey("state", RegistryState)
TIMINGS = web.AppKey("timings", Timings)
LIMITS = web.AppKey("limits", Limits)
TOKEN = web.AppKey("token", str)  # absent: no bearer token required
OBSERVER = web.AppKey("observer", Observer)  # absent: the state is fed by someone else
IDENTITIES = web.AppKey("identities", Identities)
CLIENT_LOG = web.AppKey("client_log", ClientLog)
CONNECTIONS = web.AppKey("connections", ConnectionTable)
PACE = web.AppKey("pace", RateLimiter)
REPORT_RATE = web.AppKey("report_rate", RateLimiter)
PUNCH_RATE = web.AppKey("punch_rate", RateLimiter)
STREAMS = web.AppKey("streams", dict[Key, list[Stream]])  # each caller's, oldest first
METRICS = web.AppKey("metrics", RegistryMetrics)
CALLER = web.RequestKey("caller", Key)
