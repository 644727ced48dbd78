"""What the node agent should do about one peer, decided purely from what it knows now.

No sockets, no clock, no asyncio: `decide()` takes the device's view of the peer, the
registry's view, the agent's memory of earlier attempts and the time, and returns one
`Decision` with its reason. The agent's `Actor` (act.py) is the only place that acts on
it. Every branch here has a row in tests/test_node_decide.py.

The rules (DESIGN.md §3):
- A working path is never overwritten. A live session stays as it is, whatever the registry
  says, unless a path probe through the tunnel goes unanswered after the registry reported a
  new endpoint for the peer (NAT rebinding, roaming): then the endpoint is moved, keeping the
  session's keys. A probe on the new endpoint that goes unanswered too asks the registry for
  a punch at once: the peer's NAT, which rebound, filters us until the peer sends toward us.
- A peer without a live session gets the registry's endpoint through handshake-now, at the
  moment the registry's punch event reaches both sides, so both NATs open at once.
- Simultaneous initiations that both arrive cancel each other out in WireGuard (each side
  replaces its own pending handshake with the peer's, and neither response then matches;
  measured: the next try comes 5 s later). They both arrive whenever the two sides send
  within one one-way delay of each other, which a punch aims for. So on a punch event only
  the *initiator* of a pair (registry/punch.py: the lower public key, or the NATed side
  when the other has no NAT) sends an initiation; the other side opens its
  NAT with an empty datagram from the WireGuard port (node/punch.py) and answers the
  initiation when it comes. Without raw sockets it must use an initiation to open its NAT,
  and then does so only on its first attempt, for a new endpoint, or in WireGuard's own 5 s
  rhythm. Either side may ask for punches quickly: the request makes the initiator act.
- The initiator's initiation must not reach the other side's NAT before that side's opener
  has left it: a router that keeps state for unsolicited packets (DESIGN.md §3, the lab's
  `collision` kind) would then give the other side's packets toward us a new outside port,
  and every retry of ours keeps that state alive (measured: never direct). So the other side,
  once its opener is out, says so through the registry (a second punch event, `opened`), and
  the initiator sends then; without that word within opener_wait_s (an older peer, a lost
  request) it sends anyway. A fixed delay was not enough: in the 14-node lab on 2 busy cores
  a peer's agent took longer than 20 ms to send its opener. A punch event
  reaches the other side only if its agent follows the registry, which we know once it has
  reported itself (its report follows its watch stream, follow.py). So the initiator ignores
  punch events for a peer that has not reported: the peer's own request, when its agent is
  up, brings the next one, and the registry lets it through (registry/state.py). Nor does it
  ask for punches for such a peer during its first peer_grace_s: when both agents start
  together, a request of ours could reach the peer after its stream opened and before its
  report, so that it opens its NAT and we ignore the event, and the registry would then
  coalesce its own request. If that happens anyway (a peer starting later), we ask again as
  soon as the coalescing window has passed and the peer has reported.
- The other side opens only once the initiator's agent has reported itself too: the report
  lists the initiator's IPv6 endpoints, which the registry's observed endpoint does not, and
  an opener toward IPv4 alone lets in no initiation over IPv6 (measured in the lab,
  `dual-fw`: in 1 of 8 runs the punch event came first, the first attempt failed, and the
  pair ended up on IPv4). It waits report_wait_s at most: a report that failed must not
  keep the pair apart. And where the peer has IPv6 endpoints, the opener goes to them and
  to its IPv4 endpoint alike (`Decision.also`), so whichever the initiator tries, and each
  side fails over on its own clock, the initiation finds our side open.
- A live session that sends but hears nothing (a NAT on the way lost its state: reboot,
  conntrack flush) is probed; an unanswered probe asks the registry for a punch, which makes
  the other side send too and so reopen its NAT.
- A punch event for a peer whose session is live on our side means the other side has none
  (its confirmation packet was lost, or its NAT forgot the mapping): we send a path probe,
  which is data on the live session: it confirms the session there and reopens our NAT,
  without touching our configuration.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..wg.model import Endpoint, PeerState
from .candidates import Candidate, CandidateKind, PathKind, choose, path_of
from .timings import Timings


class Kind(enum.StrEnum):
    LEAVE = "leave"  # do nothing
    REQUEST_PUNCH = "request-punch"  # ask the registry to make both sides act now
    HANDSHAKE = "handshake"  # handshake-now toward `endpoint`
    OPEN = "open"  # open our NAT toward `endpoint` with a raw datagram; no initiation
    PROBE = "probe"  # send a packet through the tunnel and watch for an answer
    REPOINT = "repoint"  # move a live session to `endpoint`, then probe


class Reason(enum.StrEnum):
    LIVE = "live session"
    ROAMED = "live session on the endpoint the registry reports"
    NO_ENDPOINT = "the registry knows no endpoint for the peer"
    NO_SESSION = "no live session"
    RETRY = "earlier attempt got no handshake"
    WAITING = "waiting before the next attempt"
    PUNCH = "punch event from the registry"
    PEER_PUNCHING = "punch event: the initiator sends, our NAT is open from our last attempt"
    PEER_STARTING = ("the peer's agent has not reported itself yet: its own punch request "
                     "will come when it follows the registry")
    PEER_READY = "the peer's agent reported itself after we ignored a punch event: punching again"
    OPEN_AWAITS_REPORT = ("punch event: we open once the peer's agent has reported itself "
                          "(where it can be reached: its IPv6 endpoints)")
    PEER_NOT_READY = ("punch event, but the peer's agent has not reported itself: it may have "
                      "missed the punch, so an initiation now could reach its NAT unopened")
    AWAITING_OPENER = "punch event: waiting for the peer to say its NAT is open for us"
    OPENING = "punch event: opening our NAT for the initiator's handshake"
    MAPPED = ("the peer sends to the port we mapped on our NAT: we send nothing toward it "
              "first (node/portmap/rule.py)")
    SUSPECT = "the registry reports a new endpoint while the session looks live"
    PROBE_PENDING = "waiting for an answer to the path probe"
    PROBE_ANSWERED = "path probe answered: the current path works"
    PROBE_UNANSWERED = "path probe unanswered: moving to the registry's endpoint"
    PUNCH_LIVE = "punch event while our session is live: the peer's side needs data"
    STALLED = "we send but hear nothing: probing the path"
    STALL_UNANSWERED = "stall probe unanswered: asking the peer to send (punch)"
    SILENT = "no bytes from the peer for too long: the path is dead"
    MOVED_UNANSWERED = ("path probe unanswered after the move too: asking the peer to send "
                        "(punch)")


@dataclass(frozen=True, slots=True)
class Memory:
    """What the agent remembers about a peer between ticks (monotonic times)."""

    rx_bytes: int = 0
    rx_changed_at: float | None = None
    tx_bytes: int = 0
    tx_changed_at: float | None = None
    attempts: int = 0  # attempts (punch requests) since the last live session
    attempt_at: float | None = None  # the backoff clock
    attempt_endpoint: Endpoint | None = None
    first_attempt_at: float | None = None  # for time-to-direct
    opened_at: float | None = None  # our last handshake-now or opener: our NAT was opened
    opened_endpoint: Endpoint | None = None
    unready_since: float | None = None  # we first saw the peer's agent not reported
    skipped: bool = False  # we ignored a punch event: the peer's agent had not reported
    open_pending_since: float | None = None  # a punch event to open for came before the
    # peer's report: we open when it comes, or after report_wait_s
    probe_at: float | None = None
    probe_rx_bytes: int = 0
    probe_endpoint: Endpoint | None = None  # the registry endpoint that caused the probe
    cleared_endpoint: Endpoint | None = None  # a reported endpoint a probe showed irrelevant
    repointed: bool = False  # the probe's endpoint has been set on the live session
    # Candidates an attempt got no handshake from, while others are left to try (failover).
    failed: frozenset[Endpoint] = frozenset()
    # We initiate, a punch event came, and the peer has not yet said its NAT is open.
    awaiting_opener_since: float | None = None

    def observe(self, rx_bytes: int, tx_bytes: int, now: float) -> Memory:
        mem = self
        if mem.rx_changed_at is None or rx_bytes != mem.rx_bytes:
            mem = replace(mem, rx_bytes=rx_bytes, rx_changed_at=now)
        if mem.tx_changed_at is None or tx_bytes != mem.tx_bytes:
            mem = replace(mem, tx_bytes=tx_bytes, tx_changed_at=now)
        return mem

    def stalled(self, now: float, t: Timings) -> bool:
        """We sent after the peer's last byte, and that byte is stall_s old."""
        return (
            self.rx_changed_at is not None
            and self.tx_changed_at is not None
            and self.tx_changed_at > self.rx_changed_at
            and now - self.rx_changed_at >= t.stall_s
        )


@dataclass(frozen=True, slots=True)
class Decision:
    kind: Kind
    reason: Reason
    endpoint: Endpoint | None = None
    recheck_s: float = 1.0
    live: bool = False  # the peer has a working session (the path is up)
    path: PathKind = PathKind.NONE  # what the live session runs over (candidates.py)
    also: tuple[Endpoint, ...] = ()  # OPEN: the same opener toward these too (module doc)


def retry_delay(attempts: int, t: Timings) -> float:
    if attempts <= 0:
        return 0.0
    return min(t.first_retry_s * 2.0 ** (attempts - 1), t.max_retry_s)


def failover(mem: Memory, candidates: Sequence[Candidate], *, live: bool, now: float,
             t: Timings) -> Memory:
    """Give up a candidate that an attempt got no handshake from, when its retry is due and
    another candidate is left: the retry then goes to the next one (decide() skips the failed
    ones). Once every candidate has failed, all are tried again, in order. A peer with a
    live session has nothing failed."""
    if live:
        return mem if not mem.failed else replace(mem, failed=frozenset())
    tried = mem.attempt_endpoint
    if (tried is None or mem.attempt_at is None or tried in mem.failed
            or now - mem.attempt_at < retry_delay(mem.attempts, t)
            or not any(c.endpoint == tried for c in candidates)):
        return mem
    failed = mem.failed | {tried}
    if all(c.endpoint in failed for c in candidates):
        return replace(mem, failed=frozenset())
    return replace(mem, failed=failed)


def path_is_dead(peer: PeerState, mem: Memory, now_wall: float, now: float, t: Timings) -> bool:
    if not peer.has_live_session(now_wall, t.session_live_s):
        return True
    return mem.rx_changed_at is not None and now - mem.rx_changed_at >= t.silence_dead_s


def decide(
    peer: PeerState,
    candidates: Sequence[Candidate],
    mem: Memory,
    *,
    initiator: bool,
    punched: bool,
    opened: bool = False,
    can_open: bool = False,
    peer_ready: bool = True,
    now_wall: float,
    now: float,
    t: Timings,
) -> Decision:
    """One peer, one tick. `candidates`: where the peer may be reached (candidates.py), of
    which `choose` picks the one to try or to move to; `punched`: a punch event for this peer
    arrived since last tick; `can_open`: raw NAT openers work here (node/punch.py);
    `peer_ready`: the peer's agent has reported itself to the registry, so it gets punch
    events too."""
    usable = [c for c in candidates if c.endpoint not in mem.failed] or candidates
    chosen = choose(usable, current=peer.endpoint)
    # A relay is opened by sending to it (its slot binds to what arrives), never by an
    # opener that dies on the way.
    decision = _decide(peer, None if chosen is None else chosen.endpoint, mem,
                       initiator=initiator, punched=punched, opened=opened,
                       can_open=can_open and chosen is not None and chosen.direct,
                       # The peer's port mapping lets our initiation in: no opener to wait for.
                       to_mapping=chosen is not None and chosen.kind is CandidateKind.MAPPED,
                       peer_ready=peer_ready, now_wall=now_wall, now=now, t=t)
    if decision.live:
        return replace(decision, path=path_of(peer.endpoint, candidates))
    if decision.kind is Kind.OPEN and any(c.kind is CandidateKind.IPV6 for c in candidates):
        return replace(decision, also=tuple(
            c.endpoint for c in candidates
            if c.kind in (CandidateKind.IPV6, CandidateKind.PUBLIC)
            and c.endpoint != decision.endpoint))
    return decision


def _decide(
    peer: PeerState,
    target: Endpoint | None,  # the chosen candidate's endpoint
    mem: Memory,
    *,
    initiator: bool,
    punched: bool,
    opened: bool,
    can_open: bool,
    to_mapping: bool,
    peer_ready: bool,
    now_wall: float,
    now: float,
    t: Timings,
) -> Decision:
    if not path_is_dead(peer, mem, now_wall, now, t):
        return _decide_live(peer, target, mem, punched, now, t)
    agentless = (not peer_ready and mem.unready_since is not None
                 and now - mem.unready_since >= t.agentless_after_s)
    if agentless:
        peer_ready = True
    if target is None:
        return Decision(Kind.LEAVE, Reason.NO_ENDPOINT, recheck_s=t.idle_recheck_s)
    pending = mem.open_pending_since
    if (punched or pending is not None) and not initiator and can_open:
        if not peer_ready and (pending is None or now - pending < t.report_wait_s):
            return Decision(Kind.LEAVE, Reason.OPEN_AWAITS_REPORT, target, t.busy_recheck_s)
        return Decision(Kind.OPEN, Reason.OPENING, target, t.busy_recheck_s)
    if punched and initiator and not peer_ready:
        return Decision(Kind.LEAVE, Reason.PEER_NOT_READY, target, t.busy_recheck_s)
    if initiator and (punched or mem.awaiting_opener_since is not None):
        # A peer without an agent opens nothing and says nothing.
        if opened or agentless or to_mapping or (mem.awaiting_opener_since is not None
                                   and now - mem.awaiting_opener_since >= t.opener_wait_s):
            return Decision(Kind.HANDSHAKE, Reason.PUNCH, target, t.busy_recheck_s)
        return Decision(Kind.LEAVE, Reason.AWAITING_OPENER, target, t.busy_recheck_s)
    if (initiator and not peer_ready and mem.unready_since is not None
            and now - mem.unready_since < t.peer_grace_s):
        return Decision(Kind.LEAVE, Reason.PEER_STARTING, target, t.busy_recheck_s)
    if (initiator and peer_ready and mem.skipped and mem.attempt_at is not None
            and now - mem.attempt_at >= t.coalesce_s):
        return Decision(Kind.REQUEST_PUNCH, Reason.PEER_READY, target,
                        t.busy_recheck_s)
    if punched and (
        mem.opened_at is None
        or mem.opened_endpoint != target
        or now - mem.opened_at >= t.passive_retry_s
    ):
        return Decision(Kind.HANDSHAKE, Reason.PUNCH, target, t.busy_recheck_s)
    if punched:  # an attempt is under way: the backoff clock restarts (see Actor.act)
        return Decision(Kind.LEAVE, Reason.PEER_PUNCHING, target, t.busy_recheck_s)
    if mem.attempt_at is None or mem.attempt_endpoint != target:
        return Decision(Kind.REQUEST_PUNCH, Reason.NO_SESSION, target, t.busy_recheck_s)
    wait = retry_delay(mem.attempts, t) - (now - mem.attempt_at)
    if wait <= 0:
        return Decision(Kind.REQUEST_PUNCH, Reason.RETRY, target, t.busy_recheck_s)
    # Poll closely right after an attempt, so the handshake is seen (and logged) at once.
    recheck = t.busy_recheck_s if now - mem.attempt_at < 2.0 else min(wait, t.idle_recheck_s)
    return Decision(Kind.LEAVE, Reason.WAITING, recheck_s=recheck)


def _decide_live(
    peer: PeerState,
    target: Endpoint | None,
    mem: Memory,
    punched: bool,
    now: float,
    t: Timings,
) -> Decision:
    if punched and (mem.probe_at is None or now - mem.probe_at >= t.probe_timeout_s):
        return Decision(Kind.PROBE, Reason.PUNCH_LIVE, None, t.busy_recheck_s, live=True)
    if (mem.repointed and mem.probe_at is not None and target is not None
            and target == peer.endpoint == mem.probe_endpoint
            and peer.rx_bytes == mem.probe_rx_bytes
            and (mem.attempt_at is None or mem.attempt_at < mem.probe_at)):
        # Moved, and the probe on the new endpoint is unanswered so far: the peer's NAT
        # filters us until the peer sends toward us (its NAT rebound, ours kept its
        # mapping). Asked once; after that the stall rule, with its backoff, as below.
        if now - mem.probe_at < t.probe_timeout_s:
            return Decision(Kind.LEAVE, Reason.PROBE_PENDING, recheck_s=t.busy_recheck_s,
                            live=True)
        return Decision(Kind.REQUEST_PUNCH, Reason.MOVED_UNANSWERED, target,
                        t.busy_recheck_s, live=True)
    stalled = mem.stalled(now, t)
    if (
        target is None
        or target == peer.endpoint
        # A report a probe showed irrelevant stays so while the path answers; once it is
        # silent, the report is the way out (a relay slot that replaced one of a registry
        # that went away, while the old slot still forwarded: node/registries.py).
        or (target == mem.cleared_endpoint and not stalled)
    ):
        if stalled:
            return _decide_stalled(mem, now, t)
        reason = Reason.ROAMED if target == peer.endpoint else Reason.LIVE
        return Decision(Kind.LEAVE, reason, recheck_s=t.idle_recheck_s, live=True)
    if mem.probe_at is None or mem.probe_endpoint != target:
        return Decision(Kind.PROBE, Reason.SUSPECT, target, t.busy_recheck_s, True)
    if peer.rx_bytes != mem.probe_rx_bytes:
        return Decision(
            Kind.LEAVE, Reason.PROBE_ANSWERED, target, t.idle_recheck_s, True
        )
    if now - mem.probe_at < t.probe_timeout_s:
        return Decision(Kind.LEAVE, Reason.PROBE_PENDING, recheck_s=t.busy_recheck_s, live=True)
    if not mem.repointed:
        return Decision(
            Kind.REPOINT, Reason.PROBE_UNANSWERED, target, t.busy_recheck_s, True
        )
    # Moved and probed again, still nothing: the session is as good as dead.
    return Decision(Kind.REQUEST_PUNCH, Reason.SILENT, target, t.busy_recheck_s)


def _decide_stalled(mem: Memory, now: float, t: Timings) -> Decision:
    assert mem.rx_changed_at is not None
    if mem.probe_at is None or mem.probe_at < mem.rx_changed_at:
        return Decision(Kind.PROBE, Reason.STALLED, None, t.busy_recheck_s, live=True)
    if now - mem.probe_at < t.probe_timeout_s:
        return Decision(Kind.LEAVE, Reason.PROBE_PENDING, recheck_s=t.busy_recheck_s, live=True)
    if mem.attempt_at is None or now - mem.attempt_at >= retry_delay(mem.attempts, t):
        return Decision(Kind.REQUEST_PUNCH, Reason.STALL_UNANSWERED, None, t.busy_recheck_s,
                        live=True)
    return Decision(Kind.LEAVE, Reason.WAITING, recheck_s=t.idle_recheck_s, live=True)
