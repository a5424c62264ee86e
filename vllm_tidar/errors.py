"""Errors a user can cause; the CLI prints them as one line."""


class TidarError(Exception):
    """A bad input or setting, reported as one clear line (never a traceback)."""
