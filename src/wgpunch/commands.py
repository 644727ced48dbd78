"""The subcommands of `wgpunch`: name, the module that implements it, and its one-line help.

cli.py imports a subcommand's module only when that subcommand is asked for: `wgpunch --help`
needs nothing but this table, and `wgpunch node ...` loads the node's module and none of the
others' (bench/startup.py measures both). Each module's `add_parser` takes its help from here.
"""

from __future__ import annotations

# name -> (module, one-line help), in the order `wgpunch --help` lists them
COMMANDS: dict[str, tuple[str, str]] = {
    "registry": ("wgpunch.registry.cli",
                 "run the registry: publish peers' observed endpoints to nodes"),
    "relay": ("wgpunch.registry.relaycli",
              "run a relay alone, on a host of its own (a registry hands out its slots)"),
    "rendezvous": ("wgpunch.natpunch.cli",
                   "a natpunch server: nodes behind NATs find each other without a registry "
                   "peer"),
    "node": ("wgpunch.node.cli",
             "keep this host's WireGuard peers on direct paths, with a registry's help"),
    # one module, three subcommands, added together in this order
    "init": ("wgpunch.onboard.cli", "set up a registry host: its key and wg-quick config"),
    "invite": ("wgpunch.onboard.cli", "add a node to the registry and write its wg-quick config"),
    "revoke": ("wgpunch.onboard.cli", "remove an invited node from the registry"),
    "status": ("wgpunch.status", "show WireGuard interfaces and their peers"),
    "netcheck": ("wgpunch.netcheck",
                 "measure this host's NAT with the registry's help, and say what it means"),
    "lab": ("wgpunch.lab.cli", "build and drive the network-namespace NAT lab"),
    "demo": ("wgpunch.demo", "run registry and NATed nodes in the lab and show a direct tunnel"),
    "systemd": ("wgpunch.service",
                "install systemd units for the registry, the node and the rendezvous server"),
    "completion": ("wgpunch.completion", "print a shell completion script (bash or zsh)"),
}


def help_of(name: str) -> str:
    return COMMANDS[name][1]
