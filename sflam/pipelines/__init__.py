"""Experiments built from the core: train, compare, scale, tradeoff; each returns a typed result."""
