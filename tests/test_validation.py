"""Inputs that used to be taken as they came and only failed later, or never (issue: the
registry under abuse, item 7): each is refused at once with a line that names it."""

import base64
import re
from pathlib import Path

import pytest

from wgpunch.cli import build_parser
from wgpunch.errors import ConfigError, WgpunchError
from wgpunch.natpunch import keyfile
from wgpunch.node import cli as node_cli

KEY = base64.b64encode(bytes(32)).decode()


@pytest.mark.parametrize(("url", "message"), [
    ("ftp://x", "expected http://HOST[:PORT] or https://HOST[:PORT]"),
    ("http://[::1", "Invalid IPv6 URL"),
    ("http://10.99.0.254:99999", "Port out of range"),
    ("10.99.0.254:51821", "expected http://HOST[:PORT]"),
])
def test_a_node_api_url_it_cannot_use_is_refused_at_start(url, message):
    """Before, the node ran forever logging the URL at each failed request."""
    args = build_parser().parse_args(["node", "-i", "wg0", "--registry", KEY, "--api", url])
    with pytest.raises(ConfigError, match=re.escape(message)):
        node_cli.settings_from(args, environ={})


def test_a_usable_api_url_is_kept():
    args = build_parser().parse_args(["node", "-i", "wg0", "--registry", KEY, "--api",
                                      "http://[fd00::1]:51821"])
    assert node_cli.settings_from(args, environ={}).api == "http://[fd00::1]:51821"


@pytest.mark.parametrize("timeout", ["-5", "0", "nan", "inf", "soon"])
def test_a_demo_timeout_that_is_no_time_is_refused(timeout, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["demo", "--timeout", timeout])
    assert info.value.code == 2 and "argument --timeout" in capsys.readouterr().err


def test_a_rendezvous_key_path_in_a_missing_directory_makes_no_directories(tmp_path: Path):
    """Only the key's own directory is made (the default /var/lib/wgpunch); a mistyped path
    used to leave a tree of directories behind."""
    path = tmp_path / "missing" / "dir" / "key"
    with pytest.raises(WgpunchError, match="cannot create key file"):
        keyfile.load_or_create(path)
    assert not (tmp_path / "missing").exists()
    made = keyfile.load_or_create(tmp_path / "state" / "key")  # its own directory: made
    assert (tmp_path / "state" / "key").stat().st_mode & 0o777 == 0o600 and made
