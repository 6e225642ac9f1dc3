"""Sending results to configured destinations (C-STORE SCU)."""
