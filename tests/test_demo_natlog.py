"""demo.py's NatLog: what a node's JSON log says of its NAT, read on from where the last read
ended (the demo reads every agent's log once per round of its wait, 91 pairs asking)."""

import json

from wgpunch.demo import NatLog
from wgpunch.protocol import NatBehaviour

SYMMETRIC = NatBehaviour("address-and-port-dependent", "address-and-port-dependent", False)
CONE = NatBehaviour("endpoint-independent", "endpoint-independent", True)


def line(event: str, **fields: object) -> bytes:
    return json.dumps({"event": event, "message": "...", **fields}).encode() + b"\n"


def test_the_last_events_count_and_a_line_being_written_waits(tmp_path):
    path = tmp_path / "a.agent.log"
    path.write_bytes(line("nat_measured", **CONE.to_json()) + b"Traceback, not JSON\n"
                     + line("port_mapped") + line("nat_measured", **SYMMETRIC.to_json())
                     + line("port_unmapped")[:12])
    log = NatLog()
    log.read_on(path)
    assert (log.nat, log.mapped) == (SYMMETRIC, True)
    with path.open("ab") as out:
        out.write(line("port_unmapped")[12:])
    log.read_on(path)
    assert (log.nat, log.mapped) == (SYMMETRIC, False)


def test_a_read_parses_only_what_was_written_since_the_last(tmp_path):
    path = tmp_path / "a.agent.log"
    first = line("nat_measured", **SYMMETRIC.to_json())
    path.write_bytes(first)
    log = NatLog()
    log.read_on(path)
    # The lines already read, changed in place, are not read again; the new one is.
    changed = line("nat_measured", **CONE.to_json()).ljust(len(first) - 1) + b"\n"
    assert len(changed) == len(first)
    path.write_bytes(changed + line("port_mapped"))
    log.read_on(path)
    assert (log.nat, log.mapped) == (SYMMETRIC, True)


def test_a_bad_measurement_or_no_log_means_not_known(tmp_path):
    path = tmp_path / "a.agent.log"
    path.write_bytes(line("nat_measured", **CONE.to_json())
                     + line("nat_measured", mapping="sideways", filtering="none",
                            port_preserved=True))
    log = NatLog()
    log.read_on(None)
    log.read_on(tmp_path / "missing.log")
    assert (log.nat, log.mapped) == (None, False)
    log.read_on(path)
    assert log.nat is None
