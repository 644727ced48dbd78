"""The one exception tree of wgpunch.

Every error a user can cause or meet is a `WgpunchError`; the CLI prints its message on one
line and exits non-zero. Messages start with the layer that raised them and quote the bad
value (never a private or preshared key).
"""


class WgpunchError(Exception):
    """wgpunch failed."""


class KeyFormatError(WgpunchError, ValueError):
    """A WireGuard key is malformed."""


class DeviceNotFound(WgpunchError):
    """No WireGuard device of that name in this network namespace."""


class DeviceError(WgpunchError):
    """A WireGuard device refused or failed an operation.

    `errno` is the positive errno the backend reported (UAPI sends it negated), or 0 when the
    failure has no errno (a timeout, a broken reply).
    """

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class MalformedReply(DeviceError):
    """A device answered with something that is not a valid reply."""


class ChangeRefused(WgpunchError, ValueError):
    """A requested device change is invalid and was not sent."""
