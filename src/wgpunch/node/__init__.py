"""wgpunch node."""
