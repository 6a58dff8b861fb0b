"""API keys: ``Authorization: Bearer <key>``, compared in constant time.

Used by ``server.app`` on every ``/v1`` and ``/admin`` request when ``[server] api_key_env`` is
set. Every configured key is compared (no early exit), so timing says nothing about which key
or how much of it matched. With no key configured the server is open (the default, for a
loopback-only workstation); the README says to configure keys before binding beyond loopback.
"""

from __future__ import annotations

import hmac

from server.errors import Unauthorized


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_key(header: str | None, keys: tuple[str, ...]) -> None:
    if not keys:
        return
    token = bearer_token(header)
    if token is None:
        raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
    presented = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise Unauthorized("Incorrect API key provided.")
