"""The one exception tree of wgpunch.

Every error a user can cause or meet is a `WgpunchError`; the CLI prints its message on one
line and exits non-zero. Messages start with the layer that raised them and quote the bad
value (never a private or preshared key). Subclasses are named by meaning, not by module, and
every one of them lives here.

    WgpunchError
    ├── KeyFormatError (ValueError)     a WireGuard key is malformed
    ├── ConfigError                     a flag, config file or environment value is unusable
    ├── CapabilityError                 the process lacks a capability (CAP_NET_RAW, ...)
    ├── DeviceNotFound                  no such WireGuard device
    ├── DeviceError                     a device refused or failed an operation
    │   └── MalformedReply              ... answering with something that is not a reply
    ├── ChangeRefused (ValueError)      a device change is invalid and was not sent
    ├── MalformedMessage (ValueError)   a registry<->node message is malformed (HTTP 400)
    ├── RequestRefused                  a well-formed request the registry refuses (HTTP code)
    │   └── RateLimited                 ... because its caller asks too often (429)
    ├── ApiError                        the node's request to the registry failed
    ├── NoRecord                        a DNS-SD server has no record for a key
    ├── MalformedPacket (ValueError)    a datagram that is not a message of its protocol
    ├── NoiseError                      a Noise handshake or transport operation failed
    ├── NatpunchError                   a rendezvous server did not answer usefully
    ├── PortMapError                    a gateway did not map a port (no answer, refused)
    ├── RelayError                      the relay's kernel path or a remote relay failed
    └── LabError                        the lab could not be built or driven
"""


class WgpunchError(Exception):
    """wgpunch failed."""


class KeyFormatError(WgpunchError, ValueError):
    """A WireGuard key is malformed."""


class ConfigError(WgpunchError):
    """A flag, config file or environment value is unusable, or a daemon cannot start with
    the device and options it was given."""


class CapabilityError(WgpunchError):
    """The process lacks a capability an operation needs; the message names it."""


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


class MalformedMessage(WgpunchError, ValueError):
    """A message of the registry<->node protocol (protocol.py) is malformed: a request body,
    query or path the registry answers with HTTP 400, or a reply the node cannot read."""


class RequestRefused(WgpunchError):
    """A well-formed request that the registry's state refuses; `status` is the HTTP code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RateLimited(RequestRefused):
    """A request refused because its caller made too many of its kind: HTTP 429, with
    `retry_after_s`, the seconds until one would be accepted (the `Retry-After` header)."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, 429)
        self.retry_after_s = retry_after_s


class ApiError(WgpunchError):
    """A request to the registry's API failed: unreachable, refused, or a nonsense answer.
    `status` is the HTTP code, 0 when there was no answer."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class NoRecord(WgpunchError):
    """A DNS-SD server has no record for this key (NXDOMAIN, or no answer)."""


class MalformedPacket(WgpunchError, ValueError):
    """A datagram that is not a message of the protocol."""


class NoiseError(WgpunchError):
    """A Noise operation failed: bad message, failed authentication, or misuse."""


class NatpunchError(WgpunchError):
    """The rendezvous server did not answer (or not in a way we could read)."""


class RelayError(WgpunchError):
    """The relay's kernel fast path failed (nft or conntrack refused; the relay then forwards
    in userspace), or a relay on another host did not give a slot (no answer, a refusal, an
    answer not signed with the shared secret; the registry then asks the next relay)."""


class PortMapError(WgpunchError):
    """A gateway did not map a port: no answer, a refusal, or no gateway at all.

    `code` is the protocol's result code of a refusal (NAT-PMP, PCP), 0 when there is none.
    """

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class LabError(WgpunchError):
    """The lab could not be built or driven."""
