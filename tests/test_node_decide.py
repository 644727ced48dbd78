"""The node's decision table: one row per rule, each saying what it protects."""

from dataclasses import replace

import pytest

from wgpunch.keys import Key
from wgpunch.node.candidates import Candidate, CandidateKind
from wgpunch.node.decide import Kind, Memory, Reason, decide, failover, retry_delay
from wgpunch.node.timings import Timings
from wgpunch.wg.model import Endpoint, PeerState

T = Timings()
NOW_WALL = 1_800_000_000.0
NOW = 1000.0
KEY = Key(bytes(range(32)))
OLD = Endpoint.parse("198.51.100.2:51820")
NEW = Endpoint.parse("198.51.100.2:40000")


def peer(*, handshake_age: float | None = None, endpoint: Endpoint | None = None,
         rx: int = 0) -> PeerState:
    return PeerState(
        public_key=KEY, endpoint=endpoint, allowed_ips=(),
        latest_handshake=None if handshake_age is None else NOW_WALL - handshake_age,
        rx_bytes=rx, tx_bytes=0, persistent_keepalive=25, has_preshared_key=False,
    )


LIVE = peer(handshake_age=10, endpoint=OLD, rx=500)
FRESH_RX = Memory(rx_bytes=500, rx_changed_at=NOW - 1)


def run(p, registry_endpoint, mem=FRESH_RX, *, initiator=True, punched=False, now=NOW,
        can_open=False, peer_ready=True, opened=False):
    """decide() with the registry's endpoint as the peer's one (public) candidate."""
    candidates = () if registry_endpoint is None else (
        Candidate(CandidateKind.PUBLIC, registry_endpoint),)
    return decide(p, candidates, mem, initiator=initiator, punched=punched, opened=opened,
                  can_open=can_open, peer_ready=peer_ready, now_wall=NOW_WALL, now=now, t=T)


@pytest.mark.parametrize(
    ("intent", "args", "kwargs", "kind", "reason"),
    [
        ("a live session is left alone when the registry agrees",
         (LIVE, OLD), {}, Kind.LEAVE, Reason.ROAMED),
        ("a live session is left alone when the registry knows no endpoint",
         (LIVE, None), {}, Kind.LEAVE, Reason.LIVE),
        ("a punch event for a live session sends data on it, never a new handshake",
         (LIVE, OLD), {"punched": True}, Kind.PROBE, Reason.PUNCH_LIVE),
        ("a live session whose peer the registry sees elsewhere is probed, not changed",
         (LIVE, NEW), {}, Kind.PROBE, Reason.SUSPECT),
        ("no session and no endpoint: nothing to try",
         (peer(), None), {}, Kind.LEAVE, Reason.NO_ENDPOINT),
        ("no session, endpoint known, never tried: ask the registry for a punch",
         (peer(), OLD), {"mem": Memory()}, Kind.REQUEST_PUNCH, Reason.NO_SESSION),
        ("a punch event makes the initiator wait for the other side's opener",
         (peer(), OLD), {"punched": True}, Kind.LEAVE, Reason.AWAITING_OPENER),
        ("the other side's word that its NAT is open makes the initiator handshake at once",
         (peer(), OLD), {"punched": True, "opened": True}, Kind.HANDSHAKE, Reason.PUNCH),
        ("a punch event makes the other side handshake when it has not tried lately",
         (peer(), OLD), {"punched": True, "initiator": False}, Kind.HANDSHAKE, Reason.PUNCH),
        ("an expired session (older than Reject-After-Time) is no session",
         (peer(handshake_age=200, endpoint=OLD), OLD), {"mem": Memory()},
         Kind.REQUEST_PUNCH, Reason.NO_SESSION),
        ("a session silent for longer than keepalives allow is dead: punch again",
         (LIVE, OLD), {"mem": Memory(rx_bytes=500, rx_changed_at=NOW - 40)},
         Kind.REQUEST_PUNCH, Reason.NO_SESSION),
        ("the registry reporting a new endpoint restarts the attempts at once",
         (peer(), NEW), {"mem": Memory(attempts=3, attempt_at=NOW - 0.1, attempt_endpoint=OLD)},
         Kind.REQUEST_PUNCH, Reason.NO_SESSION),
    ],
)
def test_rules(intent, args, kwargs, kind, reason):
    decision = run(*args, **kwargs)
    assert (decision.kind, decision.reason) == (kind, reason), intent
    if kind in (Kind.HANDSHAKE, Kind.REQUEST_PUNCH):
        assert decision.endpoint == args[1]


def test_with_raw_openers_only_the_initiator_sends_initiations():
    """The other side opens its NAT with an empty datagram, every punch: nothing to cross."""
    for mem in (Memory(), Memory(opened_at=NOW - 0.1, opened_endpoint=OLD)):
        opened = run(peer(), OLD, mem, initiator=False, punched=True, can_open=True)
        assert (opened.kind, opened.reason, opened.endpoint) == (Kind.OPEN, Reason.OPENING, OLD)
    # Over IPv6 too: a stateful firewall in front of us lets the initiation in only after it.
    v6 = Endpoint.parse("[2001:db8::2]:51820")
    opened = run(peer(), v6, Memory(), initiator=False, punched=True, can_open=True)
    assert (opened.kind, opened.endpoint) == (Kind.OPEN, v6)



def test_with_ipv6_the_opener_goes_to_both_families():
    """Each side fails over from IPv6 to IPv4 on its own clock; an opener toward both lets in
    whichever the initiator tries. Without IPv6, one opener as before."""
    v6 = Endpoint.parse("[2001:db8:2::a]:51820")
    both = (Candidate(CandidateKind.IPV6, v6), Candidate(CandidateKind.PUBLIC, OLD))
    opening = decide(peer(), both, Memory(), initiator=False, punched=True, can_open=True,
                     now_wall=NOW_WALL, now=NOW, t=T)
    assert (opening.kind, opening.endpoint, opening.also) == (Kind.OPEN, v6, (OLD,))
    failed = decide(peer(), both, Memory(failed=frozenset({v6})), initiator=False,
                    punched=True, can_open=True, now_wall=NOW_WALL, now=NOW, t=T)
    assert (failed.endpoint, failed.also) == (OLD, (v6,))
    assert run(peer(), OLD, Memory(), initiator=False, punched=True, can_open=True).also == ()
    initiating = decide(peer(), both, Memory(), initiator=True, punched=True, opened=True,
                        now_wall=NOW_WALL, now=NOW, t=T)
    assert (initiating.kind, initiating.endpoint, initiating.also) == (Kind.HANDSHAKE, v6, ())


def test_the_initiator_sends_once_the_other_side_says_its_nat_is_open():
    """On a punch event the initiator waits for the other side's `opened` (its opener is out
    of its NAT), or opener_wait_s at most (a peer too old to say it), never longer."""
    waiting = run(peer(), OLD, Memory(), punched=True, can_open=True)
    assert (waiting.kind, waiting.reason, waiting.recheck_s) == (
        Kind.LEAVE, Reason.AWAITING_OPENER, T.busy_recheck_s)
    both = run(peer(), OLD, Memory(), punched=True, opened=True)  # in the same tick
    assert (both.kind, both.reason, both.endpoint) == (Kind.HANDSHAKE, Reason.PUNCH, OLD)
    since = Memory(awaiting_opener_since=NOW - 0.1)
    assert run(peer(), OLD, since).reason is Reason.AWAITING_OPENER
    word = run(peer(), OLD, since, opened=True)
    assert (word.kind, word.endpoint) == (Kind.HANDSHAKE, OLD)
    late = run(peer(), OLD, Memory(awaiting_opener_since=NOW - T.opener_wait_s))
    assert (late.kind, late.endpoint) == (Kind.HANDSHAKE, OLD)
    # Toward the peer's port mapping there is no opener to wait for: the mapping lets us in.
    mapped = decide(peer(), (Candidate(CandidateKind.MAPPED, NEW),
                             Candidate(CandidateKind.PUBLIC, OLD)), Memory(), initiator=True,
                    punched=True, now_wall=NOW_WALL, now=NOW, t=T)
    assert (mapped.kind, mapped.endpoint) == (Kind.HANDSHAKE, NEW)
    # The other side never waits: it opens, and an `opened` that reaches it means nothing.
    assert run(peer(), OLD, Memory(), initiator=False, opened=True).kind is not Kind.HANDSHAKE


def test_the_initiator_sends_only_to_a_peer_whose_agent_follows_punches():
    """A punch event the peer's agent may have missed (it has not reported itself: not
    started yet) brings no initiation: on a NAT that keeps state for unsolicited packets it
    would arrive before the peer's opener and leave state that every retry refreshes. The
    peer's own request, once its agent is up, brings the next punch event."""
    for can_open in (True, False):
        waiting = run(peer(), OLD, Memory(), punched=True, can_open=can_open, peer_ready=False)
        assert (waiting.kind, waiting.reason) == (Kind.LEAVE, Reason.PEER_NOT_READY)
        assert waiting.recheck_s == T.busy_recheck_s
    # It asks for no punch while the peer may be starting with us: the peer's own request,
    # after its report, brings the punch event we act on ...
    starting = run(peer(), OLD, Memory(unready_since=NOW - 0.1), peer_ready=False)
    assert (starting.kind, starting.reason) == (Kind.LEAVE, Reason.PEER_STARTING)
    # ... but a peer that stays silent is asked for, as before (its agent may come up later).
    late = run(peer(), OLD, Memory(unready_since=NOW - T.peer_grace_s), peer_ready=False)
    assert (late.kind, late.reason) == (Kind.REQUEST_PUNCH, Reason.NO_SESSION)
    # An ignored event, then the peer reports: ask again once the registry no longer
    # coalesces (its window after our last request), not at the 0.5 s retry.
    skipped = Memory(attempts=1, attempt_at=NOW - 0.1, attempt_endpoint=OLD, skipped=True)
    assert run(peer(), OLD, skipped).reason is Reason.WAITING
    again = run(peer(), OLD, replace(skipped, attempt_at=NOW - T.coalesce_s - 0.01))
    assert (again.kind, again.reason) == (Kind.REQUEST_PUNCH, Reason.PEER_READY)
    # A peer still not reported waits for the ordinary retry.
    assert run(peer(), OLD, replace(skipped, attempt_at=NOW - T.coalesce_s - 0.01),
               peer_ready=False).reason is Reason.WAITING
    # ... and the other side opens its NAT on any punch event, once the initiator's report
    # (its IPv6 endpoints) is in, or report_wait_s after the event without it.
    waits = run(peer(), OLD, Memory(), initiator=False, punched=True, can_open=True,
                peer_ready=False)
    assert (waits.kind, waits.reason) == (Kind.LEAVE, Reason.OPEN_AWAITS_REPORT)
    assert waits.recheck_s == T.busy_recheck_s
    pending = Memory(open_pending_since=NOW - 0.05)
    still = run(peer(), OLD, pending, initiator=False, can_open=True, peer_ready=False)
    assert still.reason is Reason.OPEN_AWAITS_REPORT
    for mem, ready in ((pending, True), (Memory(open_pending_since=NOW - T.report_wait_s), False)):
        opening = run(peer(), OLD, mem, initiator=False, can_open=True, peer_ready=ready)
        assert (opening.kind, opening.endpoint) == (Kind.OPEN, OLD)
    # A live session is no punch at all: its probe is data on the session.
    assert run(LIVE, OLD, punched=True, peer_ready=False).kind is Kind.PROBE
    # A peer that never reports runs no agent: after agentless_after_s it is punched as
    # before reports counted, or a plain WireGuard peer would never be reached.
    agentless = Memory(unready_since=NOW - T.agentless_after_s)
    initiation = run(peer(), OLD, agentless, punched=True, peer_ready=False)
    assert initiation.kind is Kind.HANDSHAKE
    not_yet = Memory(unready_since=NOW - T.agentless_after_s + 0.5)
    assert run(peer(), OLD, not_yet, punched=True, peer_ready=False).kind is Kind.LEAVE


def test_without_raw_openers_the_non_initiator_keeps_to_wireguards_rhythm():
    """Crossed initiations cancel out in WireGuard: quick repeats from both sides would cross
    again, so after its first attempt the non-initiator keeps to WireGuard's 5 s rhythm."""
    tried = Memory(attempts=1, attempt_at=NOW - 0.6, attempt_endpoint=OLD,
                   opened_at=NOW - 0.6, opened_endpoint=OLD)
    for initiator in (True, False):  # either side may ask: the request moves the initiator
        assert run(peer(), OLD, tried, initiator=initiator).kind is Kind.REQUEST_PUNCH
    assert run(peer(), OLD, tried, initiator=True, punched=True, opened=True).kind is (
        Kind.HANDSHAKE)
    answered = run(peer(), OLD, tried, initiator=False, punched=True)
    assert (answered.kind, answered.reason) == (Kind.LEAVE, Reason.PEER_PUNCHING)
    assert answered.recheck_s == T.busy_recheck_s  # watch closely for the handshake
    later = replace(tried, opened_at=NOW - T.passive_retry_s)
    assert run(peer(), OLD, later, initiator=False, punched=True).kind is Kind.HANDSHAKE
    moved = replace(tried, opened_endpoint=NEW)
    assert run(peer(), OLD, moved, initiator=False, punched=True).kind is Kind.HANDSHAKE
    # Its own punch request is no handshake: the event it brings back must open its NAT.
    asked = Memory(attempts=1, attempt_at=NOW - 0.01, attempt_endpoint=OLD)
    assert run(peer(), OLD, asked, initiator=False, punched=True).kind is Kind.HANDSHAKE


def test_punch_probes_are_spaced():
    probed = replace(FRESH_RX, probe_at=NOW - 0.2)
    assert run(LIVE, OLD, probed, punched=True).kind is Kind.LEAVE
    assert run(LIVE, OLD, replace(probed, probe_at=NOW - T.probe_timeout_s),
               punched=True).kind is Kind.PROBE


def test_backoff_doubles_and_is_capped():
    assert [retry_delay(n, T) for n in range(1, 5)] == [0.5, 1.0, 2.0, 4.0]
    assert retry_delay(20, T) == T.max_retry_s
    tried = Memory(attempts=2, attempt_at=NOW - 0.9, attempt_endpoint=OLD)
    assert run(peer(), OLD, tried).reason is Reason.WAITING
    assert run(peer(), OLD, replace(tried, attempt_at=NOW - 1.0)).reason is Reason.RETRY


def test_probe_sequence_for_a_rebound_peer():
    """Registry says the peer moved; the probe goes unanswered; the session is moved (its
    keys kept); if the moved path stays silent too, the peer is punched afresh."""
    first = run(LIVE, NEW)
    assert first.kind is Kind.PROBE
    probing = replace(FRESH_RX, probe_at=NOW, probe_rx_bytes=500, probe_endpoint=NEW)
    assert run(LIVE, NEW, probing, now=NOW + T.probe_timeout_s / 2).reason is Reason.PROBE_PENDING
    moved = run(LIVE, NEW, probing, now=NOW + T.probe_timeout_s)
    assert (moved.kind, moved.endpoint) == (Kind.REPOINT, NEW)
    repointed = replace(probing, repointed=True, probe_at=NOW + 1)
    stuck = run(LIVE, NEW, repointed, now=NOW + 1 + T.probe_timeout_s)
    assert (stuck.kind, stuck.reason) == (Kind.REQUEST_PUNCH, Reason.SILENT)


def test_a_moved_session_that_stays_silent_asks_the_peer_to_send_at_once():
    """After the move the device sends to the new endpoint; a probe there that goes
    unanswered means the peer's NAT filters us (its own NAT rebound, ours did not: it has
    sent nothing toward us since): a punch makes it send, once, without waiting for the
    stall (stall_s after the peer's last byte, ~1 s later: issue 18)."""
    repointed = replace(FRESH_RX, probe_at=NOW, probe_rx_bytes=500, probe_endpoint=NEW,
                        repointed=True, tx_bytes=600, tx_changed_at=NOW)
    moved = peer(handshake_age=10, endpoint=NEW, rx=500)
    pending = run(moved, NEW, repointed, now=NOW + T.probe_timeout_s / 2)
    assert (pending.kind, pending.reason) == (Kind.LEAVE, Reason.PROBE_PENDING)
    silent = run(moved, NEW, repointed, now=NOW + T.probe_timeout_s)
    assert (silent.kind, silent.reason, silent.live) == (
        Kind.REQUEST_PUNCH, Reason.MOVED_UNANSWERED, True)
    # Asked once: from then on the stall rule and its backoff, as for any silent path.
    asked = replace(repointed, attempts=1, attempt_at=NOW + T.probe_timeout_s)
    assert run(moved, NEW, asked, now=NOW + T.probe_timeout_s + 0.1).kind is Kind.LEAVE
    # Answered: the moved path works.
    heard = peer(handshake_age=10, endpoint=NEW, rx=640)
    assert run(heard, NEW, repointed, now=NOW + T.probe_timeout_s).kind is Kind.LEAVE


def test_a_bogus_endpoint_never_overwrites_a_working_path():
    """The probe is answered (rx moved): the path works, the report is noted and ignored."""
    probing = replace(FRESH_RX, probe_at=NOW, probe_rx_bytes=500, probe_endpoint=NEW)
    answered = peer(handshake_age=10, endpoint=OLD, rx=640)
    decision = run(answered, NEW, probing, now=NOW + 0.2)
    assert (decision.kind, decision.reason) == (Kind.LEAVE, Reason.PROBE_ANSWERED)
    cleared = replace(probing, cleared_endpoint=NEW, probe_at=None)
    later = cleared.observe(640, 0, NOW + 30)
    assert run(answered, NEW, later, now=NOW + 60).kind is Kind.LEAVE


def test_a_report_left_alone_is_the_way_out_once_the_path_goes_silent():
    """The report a probe showed irrelevant (the path answered then) is probed toward again
    when the path stalls, and the session moves there if the probe goes unanswered: else a
    stalled session only asks for punches, never going where the registry says."""
    cleared = Memory(rx_bytes=500, rx_changed_at=NOW - 3, tx_bytes=900,
                     tx_changed_at=NOW - 0.1, cleared_endpoint=NEW)
    first = run(LIVE, NEW, cleared)
    assert (first.kind, first.reason, first.endpoint) == (Kind.PROBE, Reason.SUSPECT, NEW)
    probed = replace(cleared, probe_at=NOW - T.probe_timeout_s, probe_rx_bytes=500,
                     probe_endpoint=NEW)
    moved = run(LIVE, NEW, probed)
    assert (moved.kind, moved.endpoint) == (Kind.REPOINT, NEW)


def test_observe_tracks_changes():
    mem = Memory().observe(10, 20, 5.0)
    assert (mem.rx_bytes, mem.rx_changed_at, mem.tx_bytes, mem.tx_changed_at) == (10, 5.0, 20, 5.0)
    assert mem.observe(10, 20, 9.0) == mem
    assert mem.observe(11, 20, 9.0).rx_changed_at == 9.0
    assert mem.observe(10, 21, 9.0).tx_changed_at == 9.0


def test_a_stalled_live_path_is_probed_then_punched():
    """A NAT on the way forgot its state: we send, nothing comes back. Probe first (cheap,
    answered when the path works); unanswered, ask for a punch so the peer sends too."""
    quiet = Memory(rx_bytes=500, rx_changed_at=NOW - 3, tx_bytes=900, tx_changed_at=NOW - 0.1)
    assert (run(LIVE, OLD, quiet).kind, run(LIVE, OLD, quiet).reason) == (
        Kind.PROBE, Reason.STALLED)
    assert run(LIVE, OLD, replace(quiet, rx_changed_at=NOW - 1)).reason is Reason.ROAMED
    idle = replace(quiet, tx_changed_at=NOW - 4)  # nothing sent since the last byte heard
    assert run(LIVE, OLD, idle).reason is Reason.ROAMED
    probed = replace(quiet, probe_at=NOW - T.probe_timeout_s / 2)
    assert run(LIVE, OLD, probed).reason is Reason.PROBE_PENDING
    unanswered = replace(quiet, probe_at=NOW - T.probe_timeout_s)
    decision = run(LIVE, OLD, unanswered)
    assert (decision.kind, decision.reason, decision.live) == (
        Kind.REQUEST_PUNCH, Reason.STALL_UNANSWERED, True)
    asked = replace(unanswered, attempts=1, attempt_at=NOW - 0.1)
    assert run(LIVE, OLD, asked).reason is Reason.WAITING


HOME_LAN = Endpoint.parse("10.1.0.3:51820")
BOTH = (Candidate(CandidateKind.LAN, HOME_LAN), Candidate(CandidateKind.PUBLIC, OLD))


@pytest.mark.parametrize(("intent", "mem", "live", "failed"), [
    ("an attempt not yet due for its retry keeps its candidate",
     Memory(attempts=1, attempt_at=NOW - 0.1, attempt_endpoint=HOME_LAN), False, set()),
    ("a LAN attempt without a handshake at its retry: given up for the next candidate",
     Memory(attempts=1, attempt_at=NOW - 0.6, attempt_endpoint=HOME_LAN), False, {HOME_LAN}),
    ("once every candidate has failed, all are tried again",
     Memory(attempts=2, attempt_at=NOW - 1.1, attempt_endpoint=OLD,
            failed=frozenset({HOME_LAN})), False, set()),
    ("an endpoint that is no candidate (any more) is nothing to give up",
     Memory(attempts=1, attempt_at=NOW - 0.6, attempt_endpoint=NEW), False, set()),
    ("a live session has nothing failed",
     Memory(failed=frozenset({HOME_LAN})), True, set()),
])
def test_failover(intent, mem, live, failed):
    assert failover(mem, BOTH, live=live, now=NOW, t=T).failed == failed, intent


def test_a_failed_lan_candidate_makes_the_retry_go_to_the_public_one():
    """Two LANs behind one NAT that cannot reach each other: the LAN address leads nowhere,
    the NAT's (hairpinned) public endpoint may."""
    first = decide(peer(), BOTH, Memory(), initiator=True, punched=False, now_wall=NOW_WALL,
                   now=NOW, t=T)
    assert (first.kind, first.endpoint) == (Kind.REQUEST_PUNCH, HOME_LAN)
    tried = Memory(attempts=1, attempt_at=NOW - 0.6, attempt_endpoint=HOME_LAN)
    mem = failover(tried, BOTH, live=False, now=NOW, t=T)
    retry = decide(peer(), BOTH, mem, initiator=True, punched=False, now_wall=NOW_WALL,
                   now=NOW, t=T)
    assert (retry.kind, retry.endpoint) == (Kind.REQUEST_PUNCH, OLD)


def test_a_live_session_on_a_lan_candidate_is_on_the_lan_path():
    live = decide(peer(handshake_age=10, endpoint=HOME_LAN, rx=500), BOTH, FRESH_RX,
                  initiator=True, punched=False, now_wall=NOW_WALL, now=NOW, t=T)
    assert (live.kind, live.live, str(live.path)) == (Kind.LEAVE, True, "lan")
