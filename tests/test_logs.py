"""Logging: -v raises wgpunch's loggers only, the options work after the command too, and no
WireGuard secret reaches the output at any verbosity."""

import io
import logging
import subprocess

import pytest
from pyroute2.netlink.generic.wireguard import wgmsg

from wgpair import wg_pair
from wgpunch import logs
from wgpunch.cli import build_parser
from wgpunch.keys import generate_keypair
from wgpunch.lab.netns import python_module, stop_process, wait_for


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {name: logging.getLogger(name).level
                                           for name in ("wgpunch", "aiohttp.access",
                                                        "pyroute2")})
    yield
    root.handlers[:], level, levels = saved
    root.setLevel(level)
    for name, value in levels.items():
        logging.getLogger(name).setLevel(value)


@pytest.mark.parametrize(("intent", "verbosity", "daemon", "libraries", "ours", "theirs"), [
    ("a one-shot command shows warnings only", 0, False, False, logging.WARNING,
     logging.WARNING),
    ("a daemon logs its events", 0, True, False, logging.INFO, logging.WARNING),
    ("-vv debugs wgpunch, not pyroute2 or aiohttp", 2, False, False, logging.DEBUG,
     logging.WARNING),
    ("--debug-libraries lets -vv reach the libraries", 2, False, True, logging.DEBUG,
     logging.DEBUG),
])
def test_levels(restore_logging, intent, verbosity, daemon, libraries, ours, theirs):
    logs.setup(verbosity, "text", daemon=daemon, debug_libraries=libraries)
    assert logging.getLogger("wgpunch.node.agent").getEffectiveLevel() == ours, intent
    for library in ("aiohttp.server", "asyncio", "dns.asyncquery"):
        assert logging.getLogger(library).getEffectiveLevel() == theirs, intent
    # Whole netlink messages, keys included, are pyroute2's DEBUG lines: never shown.
    assert logging.getLogger("pyroute2.netlink").getEffectiveLevel() == max(
        theirs, logging.INFO), intent


@pytest.mark.parametrize(("argv", "verbose", "fmt", "libraries"), [
    (["status"], 0, "text", False),
    (["-v", "status"], 1, "text", False),
    (["status", "-vv", "--log-format", "json"], 2, "json", False),
    (["-v", "--log-format", "json", "status", "-v"], 2, "json", False),
    (["status", "--debug-libraries"], 0, "text", True),
])
def test_log_options_before_or_after_the_command(argv, verbose, fmt, libraries):
    args = build_parser().parse_args(argv)
    assert (args.verbose + getattr(args, "verbose_after", 0), args.log_format,
            args.debug_libraries) == (verbose, fmt, libraries)


def test_a_netlink_message_with_a_private_key_is_withheld(restore_logging, capsys):
    """A parsed WG_CMD_GET_DEVICE reply, which holds the private key and each peer's
    preshared key, as pyroute2 formats it into its DEBUG lines (which never pass its INFO
    cap): should one reach a level that passes, it is withheld."""
    private, _ = generate_keypair()
    psk = bytes(range(32))
    message = wgmsg()
    message["cmd"] = 0
    message["attrs"] = [("WGDEVICE_A_IFNAME", "wg0"),
                        ("WGDEVICE_A_PRIVATE_KEY", private.raw),
                        ("WGDEVICE_A_PEERS", [{"attrs": [("WGPEER_A_PRESHARED_KEY", psk)]}])]
    logs.setup(2, "json", debug_libraries=True)
    logging.getLogger("pyroute2.netlink.nlsocket").debug("message %s", message)  # capped
    logging.getLogger("pyroute2.netlink.nlsocket").warning("message %s", message)
    logging.getLogger("pyroute2.netlink.nlsocket").warning("an ordinary line")
    err = capsys.readouterr().err
    assert logs.REDACTED in err and "an ordinary line" in err
    for secret in (private.raw, psk):
        assert repr(secret)[2:-1][:40] not in err  # bytes as Python prints them
    assert private.base64() not in err and "PRIVATE_KEY" not in err


def test_our_own_lines_are_never_withheld(restore_logging):
    stream = io.StringIO()
    logs.setup(0, "text", daemon=True)
    logging.getLogger().handlers[0].setStream(stream)
    logging.getLogger("wgpunch.node.agent").info("peer %s has no preshared_key set", "k")
    assert "has no preshared_key set" in stream.getvalue()


@pytest.mark.lab
def test_no_secret_in_any_output_at_the_highest_verbosity(tmp_path):
    """Every command that reads a device, at -vv --debug-libraries, in both log formats,
    against a device with a private key and a preshared key: neither shows anywhere."""
    _, psk_public = generate_keypair()
    psk = psk_public  # any 32 bytes will do as a preshared key
    with wg_pair(tmp_path) as (a, b):
        psk_file = tmp_path / "psk"
        psk_file.write_text(psk.base64())
        psk_file.chmod(0o600)
        a.wg_set("peer", b.public.base64(), "preshared-key", str(psk_file))
        secrets = (a.private.base64(), a.private.hex(), psk.base64(), psk.hex())
        outputs = []
        for fmt in ("text", "json"):
            common = ("-vv", "--debug-libraries", "--log-format", fmt)
            for command in (["status", "--json"], ["status"],
                            ["node", "--interface", a.ifname, "--registry", b.public.base64(),
                             "--once"]):
                argv, env = python_module("wgpunch.cli", *command, *common)
                done = a.ns.run(argv, env=env, check=False, timeout=30)
                outputs.append(done.stdout + done.stderr)
            argv, env = python_module("wgpunch.cli", *common, "registry", "--interface",
                                      a.ifname, "--poll-interval", "0.05")
            log = tmp_path / f"registry-{fmt}.log"
            with log.open("w") as sink:
                proc = a.ns.popen(argv, env=env, stdout=sink, stderr=subprocess.STDOUT)
                try:
                    # It serves once its observer has read the device (registry/serve.py).
                    wait_for(lambda log=log: "serving" in log.read_text(), timeout=15,
                             what="the registry to serve")
                finally:
                    stop_process(proc)
            outputs.append(log.read_text())
    assert all(outputs)
    for output in outputs:
        for secret in secrets:
            assert secret not in output
