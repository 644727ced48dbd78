"""Onboarding, on the registry host: `wgpunch init registry`, `wgpunch invite`, `wgpunch revoke`
(DESIGN §10). Membership is the registry's own WireGuard device and its wg-quick config.

Modules, one concern each:
- `wgquick.py`  a wg-quick config file as text: sections, values, wgpunch's own comments;
- `files.py`    writing 0600 files atomically, and the checks that come before;
- `members.py`  the registry's members: addresses, names, the node's config (pure);
- `invite.py`   invite and revoke: the running device and the config file, together or neither;
- `cli.py`      `wgpunch init registry`, `wgpunch invite`, `wgpunch revoke`.
"""
