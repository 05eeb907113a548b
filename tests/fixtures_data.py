"""Fixtures that build prepared datasets from ../shared/data and the synthetic generator."""
