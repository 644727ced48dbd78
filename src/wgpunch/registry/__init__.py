"""wgpunch registry."""
