"""Scheduling-side core: KV block management."""
