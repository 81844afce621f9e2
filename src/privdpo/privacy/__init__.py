"""Differential privacy: accounting, sampling, per-unit clipping and the ledger."""
