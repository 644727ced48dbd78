"""WireGuard device control: one interface over the UAPI and netlink backends."""
