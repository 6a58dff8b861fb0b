"""Reading the bearer token of an ``Authorization`` header (``server.edge`` checks it against
``server.keys.KeyStore``, in constant time)."""

from __future__ import annotations


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
