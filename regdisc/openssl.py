"""Reading pyOpenSSL's errors, for the server and the client alike."""

from __future__ import annotations

from OpenSSL import SSL


def describe_ssl_error(error: SSL.Error) -> str:
    """OpenSSL's reasons, such as ``certificate verify failed``, joined by commas."""
    # pyOpenSSL errors carry a list of (library, function, reason) tuples.
    entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
    reasons = [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry]
    return ", ".join(reasons) or str(error)
