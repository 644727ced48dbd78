"""The node's reading of wgsd answers (node/dnssd.py), from responses laid out by hand as
wgsd lays them out (shared/reference/wgsd.md §1.4): SRV in the answer, A/AAAA first in the
additional section, then TXT."""

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

from wgpunch.errors import ApiError, NoRecord
from wgpunch.keys import Key
from wgpunch.node.dnssd import parse_answer, query_name

ZONE = dns.name.from_text("mesh.internal.")
KEY = Key.from_base64("xScVkH3fUGUv4RrJFfmcqm8rs3SEHr41km6+yffAHw4=")
OTHER = Key(bytes([2]) * 32)
OWNER = f"{KEY.base32()}._wireguard._udp.mesh.internal."


def response(*, answer=True, address=("A", "198.51.100.6"), pub=KEY, allowed="10.99.0.2/32",
             rcode=dns.rcode.NOERROR):
    query = dns.message.make_query(query_name(KEY, ZONE), dns.rdatatype.SRV)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    if answer:
        reply.answer.append(dns.rrset.from_text(OWNER, 0, "IN", "SRV", f"0 0 4500 {OWNER}"))
    if address:
        reply.additional.append(dns.rrset.from_text(OWNER, 0, "IN", *address))
    if pub:
        txt = f'"txtvers=1" "pub={pub.base64()}" "allowed={allowed}"'
        reply.additional.append(dns.rrset.from_text(OWNER, 0, "IN", "TXT", txt))
    return reply


def test_query_name_is_wgsd_clients():
    assert query_name(KEY, ZONE).to_text() == (
        "YUTRLED535IGKL7BDLERL6M4VJXSXM3UQQPL4NMSN27MT56AD4HA====._wireguard._udp."
        "mesh.internal.")


def test_srv_address_and_txt():
    record = parse_answer(KEY, response())
    assert (str(record.endpoint), [str(n) for n in record.allowed_ips]) == (
        "198.51.100.6:4500", ["10.99.0.2/32"])
    v6 = parse_answer(KEY, response(address=("AAAA", "2001:db8::6"), allowed=""))
    assert (str(v6.endpoint), v6.allowed_ips) == ("[2001:db8::6]:4500", ())


def test_no_record():
    with pytest.raises(NoRecord):
        parse_answer(KEY, response(answer=False, address=None, pub=None,
                                   rcode=dns.rcode.NXDOMAIN))
    with pytest.raises(NoRecord):
        parse_answer(KEY, response(answer=False, address=None, pub=None))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pub": OTHER}, "TXT names another key"),
    ({"address": None}, "no A/AAAA record first"),
    ({"rcode": dns.rcode.SERVFAIL}, "SERVFAIL"),
])
def test_answers_that_do_not_fit(kwargs, message):
    with pytest.raises(ApiError, match=message):
        parse_answer(KEY, response(**kwargs))


def test_the_address_must_come_first():
    reply = response()
    reply.additional.reverse()  # TXT first: what wgsd-client would crash on
    with pytest.raises(ApiError, match="no A/AAAA record first"):
        parse_answer(KEY, reply)


@pytest.mark.parametrize(("intent", "rcode", "meaning"), [
    ("a server that does not serve the zone is an error that names --zone",
     dns.rcode.REFUSED, "REFUSED: the server does not serve this zone (is --zone"),
    ("a server that cannot read its device (wgsd without CAP_NET_ADMIN) is an error too",
     dns.rcode.SERVFAIL, "SERVFAIL: the server could not answer (wgsd: CoreDNS cannot read"),
])
def test_error_answers_are_errors_not_missing_records(intent, rcode, meaning):
    """As such answers carry no records, they were taken for "no record": a wrong zone made
    `--once` exit 0 without a word."""
    with pytest.raises(ApiError) as info:
        parse_answer(KEY, response(answer=False, address=None, pub=None, rcode=rcode))
    assert meaning in str(info.value), intent
