"""Arbitration: one model shared by many apps (scheduling, KV memory, residency, devices)."""
