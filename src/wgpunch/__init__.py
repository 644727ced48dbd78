"""wgpunch: direct WireGuard tunnels between peers behind NATs."""

__version__ = "0.1.0"
