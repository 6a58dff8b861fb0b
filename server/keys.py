"""API keys: who may call what, and how fast. Compared in constant time; never logged.

Three roles (``Key.role``):
- ``client``: ``/v1/*``. From ``$UNDERSTUDY_API_KEYS`` (comma-separated), the env var named by
  ``[server] api_key_env``, and ``[server] key_file``.
- ``admin``: everything, ``/admin/*`` and the dashboard's data included. ``$UNDERSTUDY_ADMIN_KEY``
  or a key-file line with ``role=admin``. While no admin key is configured, client keys may use
  ``/admin`` (a one-key workstation); with one, only admin keys may (403 for the others).
- ``metrics``: ``GET /metrics`` and nothing else. ``$UNDERSTUDY_METRICS_KEY`` or ``role=metrics``.
  While no metrics or admin key is configured, ``/metrics`` follows the client keys.

Key file: one key per line, ``<id> <key> [role=client|admin|metrics] [rpm=N] [burst=N]
[max_tokens=N] [max_prompt_tokens=N]``; ``#`` starts a comment. Ids name the key in logs, the
journal and metrics; keys from the environment are named by a hash prefix (``env-1a2b3c4d``).
``KeyStore.reload()`` re-reads the file (``SIGHUP``, ``server.app``): a file with an error keeps
the old keys and says which line is wrong, so a typo never locks everyone out.

Who calls: ``server.edge.Edge`` on every request (event-loop thread); ``reload`` from the SIGHUP
handler on the same thread.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("client", "admin", "metrics")
_LIMITS = {"rpm": float, "burst": int, "max_tokens": int, "max_prompt_tokens": int}


class KeyFileError(Exception):
    """The key file cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Key:
    id: str
    role: str
    secret: bytes = field(repr=False)
    rpm: float | None = None
    """Requests a minute (a token bucket refilled continuously); None = unlimited."""
    burst: int | None = None
    """Requests that may arrive at once; default a tenth of ``rpm`` (at least 1)."""
    max_tokens: int | None = None
    max_prompt_tokens: int | None = None


def env_key_id(secret: str) -> str:
    return "env-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def parse_key_file(path: Path) -> list[Key]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise KeyFileError(f"key file {path} cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"key file {path} is not UTF-8 text") from None
    keys: list[Key] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{path}:{number}"
        if len(words) < 2:
            raise KeyFileError(f"{where}: expected '<id> <key> [role=...] [rpm=N] ...'")
        key_id, secret, options = words[0], words[1], words[2:]
        if key_id in seen:
            raise KeyFileError(f"{where}: the id {key_id!r} is used twice")
        if len(secret) < 16:
            raise KeyFileError(f"{where}: the key of {key_id!r} is shorter than 16 characters")
        seen.add(key_id)
        values: dict[str, object] = {"role": "client"}
        for option in options:
            name, eq, raw = option.partition("=")
            if not eq or (name != "role" and name not in _LIMITS):
                raise KeyFileError(f"{where}: unknown option {option!r} (role, rpm, burst, max_tokens, max_prompt_tokens)")
            if name == "role":
                if raw not in ROLES:
                    raise KeyFileError(f"{where}: role must be client, admin or metrics, got {raw!r}")
                values["role"] = raw
                continue
            try:
                value = _LIMITS[name](raw)
            except ValueError:
                raise KeyFileError(f"{where}: {name} must be a number, got {raw!r}") from None
            if not 0 < value < float("inf"):
                raise KeyFileError(f"{where}: {name} must be a finite number above 0")
            values[name] = value
        keys.append(Key(key_id, secret=secret.encode(), **values))  # type: ignore[arg-type]
    return keys


class KeyStore:
    def __init__(self, client_keys: tuple[str, ...] = (), admin_key: str | None = None, metrics_key: str | None = None,
                 key_file: Path | None = None) -> None:
        self._fixed = [Key(env_key_id(k), "client", k.encode()) for k in dict.fromkeys(client_keys)]
        if admin_key:
            self._fixed.append(Key("admin", "admin", admin_key.encode()))
        if metrics_key:
            self._fixed.append(Key("metrics", "metrics", metrics_key.encode()))
        self.key_file = key_file
        self._keys: list[Key] = list(self._fixed)
        if key_file is not None:
            self._keys += parse_key_file(key_file)
        self.required = bool(self._fixed) or key_file is not None
        """Decided once, from the configuration: a key file emptied by a reload never opens the server."""

    def reload(self) -> int:
        """Re-read the key file; returns how many keys are now valid. ``KeyFileError`` keeps the old set."""
        if self.key_file is not None:
            keys = self._fixed + parse_key_file(self.key_file)
            if not keys:
                raise KeyFileError(f"key file {self.key_file} has no key left: refusing to leave the server without one")
            self._keys = keys
        return len(self._keys)

    @property
    def keys(self) -> list[Key]:
        return list(self._keys)

    def has(self, role: str) -> bool:
        return any(k.role == role for k in self._keys)

    @property
    def enabled(self) -> bool:
        """Keys are configured (env or key file): every route but the open ones needs one, even
        while the key file holds none (then every call is a 401, never an open server)."""
        return self.required

    def match(self, token: str) -> Key | None:
        """Compare the SHA-256 digests with every key's (no early exit, equal lengths): the timing
        says nothing about which key matched, nor about any key's length."""
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for key in self._keys:
            if hmac.compare_digest(presented, hashlib.sha256(key.secret).digest()) and found is None:
                found = key
        return found

    def allows(self, key: Key, route_class: str) -> bool:
        if key.role == "admin":
            return True
        if route_class == "admin":
            return key.role == "client" and not self.has("admin")
        if route_class == "metrics":
            return key.role == "metrics" or key.role == "client" and not (self.has("metrics") or self.has("admin"))
        return key.role == "client"
