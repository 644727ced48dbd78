"""The NAT lab: a small internet in network namespaces (DESIGN.md §9)."""
