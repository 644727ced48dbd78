"""What a node knows of its own NAT (RFC 4787 terms), as it reports it in `PUT /v1/self`
(`Reported.nat`) and the registry passes on in every peer record: docs/api.md.

A node measures it with the registry's help (node/natprobe.py); `NatBehaviour` checks every
field on construction, so a report naming a behaviour this version does not know is refused
(a newer node that learns more adds a field instead). roles.py decides from it who initiates
and whether a pair needs a relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import MalformedMessage

# RFC 4787 §4.1; "none": the address the registry sees is one of the node's own (no NAT);
# "unknown": not measured (no probe port answered, no raw socket).
MAPPINGS = ("none", "endpoint-independent", "address-dependent", "address-and-port-dependent",
            "unknown")
# RFC 4787 §5; "not-port-dependent": a reply from a port the node never sent to arrived, but
# the registry has no second address to tell address-dependent from endpoint-independent.
FILTERINGS = ("endpoint-independent", "address-dependent", "not-port-dependent",
              "address-and-port-dependent", "unknown")
NAT_FIELDS = ("mapping", "filtering", "port_preserved")


@dataclass(frozen=True, slots=True)
class NatBehaviour:
    mapping: str
    filtering: str
    port_preserved: bool | None  # the outside port is the listen port; None: not measured

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise MalformedMessage(f"nat.mapping: {str(self.mapping)[:60]!r} is not one of "
                                   f"{', '.join(MAPPINGS)}")
        if self.filtering not in FILTERINGS:
            raise MalformedMessage(f"nat.filtering: {str(self.filtering)[:60]!r} is not one "
                                   f"of {', '.join(FILTERINGS)}")
        if self.port_preserved is not None and not isinstance(self.port_preserved, bool):
            raise MalformedMessage("nat.port_preserved: expected a boolean or null")

    @property
    def endpoint_dependent(self) -> bool:
        """The NAT maps per destination: nobody can know beforehand the port it will use
        toward a peer (RFC 4787's address- and address-and-port-dependent mapping)."""
        return self.mapping in ("address-dependent", "address-and-port-dependent")

    @property
    def filters_per_port(self) -> bool:
        """Only the exact endpoint we sent to may answer us."""
        return self.filtering == "address-and-port-dependent"

    def to_json(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "filtering": self.filtering,
                "port_preserved": self.port_preserved}

    def words(self) -> str:
        """One line for people: `status`, `netcheck`."""
        mapping = {
            "none": "no NAT",
            "endpoint-independent": "NAT maps endpoint-independently",
            "address-dependent": "NAT maps per destination address",
            "address-and-port-dependent": "NAT maps per destination (symmetric)",
            "unknown": "NAT behaviour unknown",
        }[self.mapping]
        port = {True: ", port kept", False: ", port changed", None: ""}[self.port_preserved]
        filtering = "" if self.filtering == "unknown" else f", filtering {self.filtering}"
        return mapping + (port if self.mapping != "none" else "") + filtering


UNKNOWN = NatBehaviour("unknown", "unknown", None)


def nat_from_json(value: object) -> NatBehaviour:
    """The `nat` object of a report or a peer record, strictly: all three fields, no other."""
    if not isinstance(value, dict):
        raise MalformedMessage("nat: expected an object")
    unknown = sorted(set(value) - set(NAT_FIELDS))
    if unknown:
        raise MalformedMessage(f"nat: unknown field {str(unknown[0])[:40]!r}; allowed: "
                               f"{', '.join(NAT_FIELDS)}")
    missing = [name for name in NAT_FIELDS if name not in value]
    if missing:
        raise MalformedMessage(f"nat: missing field {missing[0]!r}")
    for name in ("mapping", "filtering"):
        if not isinstance(value[name], str):
            raise MalformedMessage(f"nat.{name}: expected text")
    return NatBehaviour(value["mapping"], value["filtering"], value["port_preserved"])
