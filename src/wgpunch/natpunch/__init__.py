"""natpunch: endpoint discovery over UDP for registries that are not WireGuard peers (DESIGN §7)."""
