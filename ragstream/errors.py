"""Errors the user can act on."""


class RagstreamError(Exception):
    """Printed by the CLI as one line (``ragstream: error: ...``), exit status 2."""
