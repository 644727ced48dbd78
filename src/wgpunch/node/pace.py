"""When the agent's next pass comes (agent.reconcile_forever), and the device read it may share.

At once when something changed (the registry's stream, a punch, a relay slot: `wake`), else
after the `recheck_s` the last pass asked for. A pass that asked for no sooner than the idle
recheck (nothing of any peer is due) may come up to half of it early: right after another
loop's read of the device, which it then shares instead of reading again (issue 18: an idle
agent read its device three times a second, once for its own pass and twice for the
registry link's heartbeat, registrylink.py). So it falls into step with the heartbeat's read
and stays there (bench/agent_footprint.py, 100 peers: 16 of 20 passes shared a read; a pass
whose half-window holds no read waits out its recheck, and the next one starts that much
later). No pass comes later than it asked for.

The shared read is never older than `SHARED_READ_S`. That is no staleness the pass does not
live with already: a pass reads once and decides every peer from that read, which takes
milliseconds with awaits between; and what must see the device as it is when it acts reads
it again itself (handshake-now refuses to replace a session that is live by then,
wg/device.py). The registry link reads for itself, always: its silence judgement needs the
rx counter of the moment (registrylink.py).
"""

from __future__ import annotations

import asyncio
import contextlib

from ..wg.device import Device

# A read that began at most this long ago is shared: a pass woken by another loop's read
# begins within a turn or two of the event loop (well under a millisecond when idle); a busier
# loop reads anew. Our choice, far below every timing the pass judges (timings.Timings:
# busy_recheck_s 0.05 s, probe_timeout_s 0.5 s).
SHARED_READ_S = 0.02


async def next_pass(wake: asyncio.Event, device: Device, recheck_s: float,
                    idle_recheck_s: float) -> None:
    """Return when the next pass is due (the module doc); `wake` is the caller's to clear."""
    early_s = idle_recheck_s / 2 if recheck_s >= idle_recheck_s else 0.0
    # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that arrives as the
    # event is set, and the agent's loop then never stops (a test agent hung on exit in 2 of
    # 6 runs while the registry stream kept failing).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(recheck_s - early_s):
            await wake.wait()
    if wake.is_set() or not early_s:
        return
    device.read_listeners.append(wake.set)
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(early_s):
                await wake.wait()
    finally:
        device.read_listeners.remove(wake.set)
