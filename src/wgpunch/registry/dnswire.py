"""Fitting a DNS response into one message: the size limits and truncation (wgsd.md §1.7).

CoreDNS writes every answer through `request.ScrubWriter`, which sizes it as miekg/dns
v1.1.57's `Msg.Truncate` does: the limit is 65535 over TCP, and over UDP the query's EDNS size
(at least 512) or 512 without EDNS. A response over the limit keeps whole records, in order
(answer, then authority, then additional), while they fit; TC is set if any record was left
out; the OPT record always comes last. A client seeing TC retries over TCP (dig does;
wgsd-client does not, but its SRV answers fit).
"""

from __future__ import annotations

from collections.abc import Iterable

import dns.exception
import dns.flags
import dns.message
import dns.rdataset
import dns.renderer
import dns.rrset

UDP_MIN = 512  # RFC 1035 §4.2.1; RFC 6891 §6.2.5: an EDNS size below it means 512
TCP_MAX = 65535  # the 2-byte length prefix of DNS over TCP (RFC 1035 §4.2.2)
OPT_SIZE = 11  # RFC 6891 §6.1.2: an OPT record without options
# RRsets with more records than this are rendered record by record at once: rendering one
# whole renders every record before finding out that it does not fit.
WHOLE_RRSET_MAX = 8


def size_limit(query: dns.message.Message | None, *, tcp: bool) -> int:
    """§1.7: 65535 over TCP; over UDP the query's EDNS size, at least 512; 512 without EDNS."""
    if tcp:
        return TCP_MAX
    if query is None or query.edns < 0:
        return UDP_MIN
    return max(UDP_MIN, query.payload)


def to_wire(response: dns.message.Message, limit: int) -> bytes:
    """`response` in at most `limit` bytes: whole records in order (answer, authority,
    additional) while they fit, TC set if any was left out, the OPT record always last.

    Never shuffled (dnspython's default): the PTR listing's order is part of the contract.
    Compression is case-exact, as miekg's: dnspython matches names case-insensitively, so a
    lowercase owner would otherwise become a pointer to the question as the client spelled
    it, and decompress in the client's case (wgsd.md §1.2: owners are lowercased).
    """
    opt_size = OPT_SIZE if response.opt is not None else 0
    renderer = dns.renderer.Renderer(response.id, response.flags, limit)
    renderer.reserve(opt_size)
    for rrset in response.question:
        renderer.add_question(rrset.name, rrset.rdtype, rrset.rdclass)
    for name in [n for n in renderer.compress if any(b != b.lower() for b in n.labels)]:
        del renderer.compress[name]
    complete = True
    for section, rrsets in ((dns.renderer.ANSWER, response.answer),
                            (dns.renderer.AUTHORITY, response.authority),
                            (dns.renderer.ADDITIONAL, response.additional)):
        complete = complete and _add_section(renderer, section, rrsets)
    if not complete:
        renderer.flags |= dns.flags.TC
    renderer.release_reserved()
    if response.opt is not None:
        renderer.add_edns(response.edns, response.ednsflags, response.payload)
    renderer.write_header()
    wire: bytes = renderer.get_wire()
    return wire


def _add_section(renderer: dns.renderer.Renderer, section: int,
                 rrsets: Iterable[dns.rrset.RRset]) -> bool:
    """Add records until one does not fit; False if one did not."""
    for rrset in rrsets:
        if len(rrset) <= WHOLE_RRSET_MAX:
            try:
                renderer.add_rrset(section, rrset, want_shuffle=False)
                continue
            except dns.exception.TooBig:
                pass  # the renderer rolled it back; try its records one by one
        for rdata in rrset:
            try:
                renderer.add_rdataset(section, rrset.name,
                                      dns.rdataset.from_rdata(rrset.ttl, rdata))
            except dns.exception.TooBig:
                return False
    return True
