"""Speculative decoding: exact verification, drafts, token trees."""
