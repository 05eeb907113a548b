"""Federated per-user fine-tuning of TLSAN with Flower (`tlsan federate`; the `federated` extra)."""
