"""Every clock the agent's pass runs on (decide.py judges by them, agent.py and quiet.py
wait by them), in one frozen dataclass: what each bounds, and where its number comes from
(WireGuard's whitepaper, a lab measurement, or our choice). Tests pass shorter ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wg.model import SESSION_LIVE_S


@dataclass(frozen=True, slots=True)
class Timings:
    # Whitepaper §6.1 Reject-After-Time: a handshake older than this has no usable session.
    session_live_s: float = SESSION_LIVE_S
    # Persistent keepalive the agent sets: NAT UDP mappings often expire after 30 s.
    keepalive_s: int = 25
    # No byte from a peer for this long although both sides keep alive every keepalive_s:
    # its path is dead even if the last handshake is recent.
    silence_dead_s: float = 35.0
    # The initiator's first re-punch after an attempt without a handshake: above the peer
    # round trip of every lab bench scenario (~120 ms with 30 ms per uplink), far below
    # WireGuard's own 5 s retry. Doubles per failure up to max_retry_s.
    first_retry_s: float = 0.5
    max_retry_s: float = 30.0
    # On a punch event the initiator waits for the other side's word that its opener is out
    # (decide.py's module doc), at most this long: a peer's agent answers its punch event
    # within a registry round trip and its own processing, ~10 ms in the lab and a few
    # hundred on a machine running 14 agents on 2 cores; an older peer never answers.
    opener_wait_s: float = 0.5
    # The other side waits at most this long for the initiator's report before it opens for
    # a punch event anyway (decide.py's module doc): a report follows its agent's first punch
    # request within a registry round trip (ms in the lab), and the opener must be out before
    # the initiator gives up waiting for it (opener_wait_s). Our choice.
    report_wait_s: float = 0.2
    # The initiator asks for no punch for a peer whose agent has not reported itself for this
    # long after it first saw it so (see decide.py's module doc): both agents started together.
    peer_grace_s: float = 1.0
    # A peer that has not reported itself for this long runs no agent (a plain WireGuard
    # peer, perhaps with a public address): punch events mean nothing to it, so the
    # initiator sends as it did before reports counted. Several punch rounds, so that an
    # agent that is merely starting late (or reconnecting) is not taken for none.
    agentless_after_s: float = 10.0
    # The registry's punch coalescing window (registry/timings.py) plus a margin: a request
    # sooner after the last one is answered without a punch event.
    coalesce_s: float = 0.3
    # A non-initiator that cannot send raw openers sends its own initiation at most this
    # often (WireGuard's REKEY_TIMEOUT): quicker ones would cross the initiator's.
    passive_retry_s: float = 5.0
    # A path probe without any byte back within this long: the path is dead. Four times the
    # worst round trip of the lab benches (easy+30ms, ~120 ms); on the recovery path after a
    # NAT rebinding (bench/time_to_direct.py rebind, forget: 1 s here made p95 above 2 s).
    probe_timeout_s: float = 0.5
    # We sent, and heard nothing from the peer for this long: probe the path. Above the lab's
    # worst round trip by far; one probe per stall, so one-way traffic (answered only by
    # WireGuard's 10 s passive keepalive) costs a packet each way every few seconds.
    stall_s: float = 2.0
    # Reconcile at least this often; far more often while an attempt or probe is pending.
    idle_recheck_s: float = 1.0
    busy_recheck_s: float = 0.05
