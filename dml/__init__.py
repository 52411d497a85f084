"""Definitive Media Library: deterministic, checksummed, signed release packages."""
