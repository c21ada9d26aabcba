"""Helpers shared by the subprocess tests (multi-host, kill and resume)."""
