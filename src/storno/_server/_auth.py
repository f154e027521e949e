"""Bearer tokens: who may read, who may operate, who may deliver webhooks.

Tokens come from the environment (``STORNO_API_TOKENS`` for operators,
``STORNO_API_READ_TOKENS`` for read-only users, ``STORNO_WEBHOOK_TOKENS`` for third parties
that may only deliver webhooks) or from a file. Only their SHA-256 digests are kept in memory;
a token is never logged, echoed or written to a run's history: actions are recorded under the
token's *name*.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from storno._errors import ConfigurationError

__all__ = [
    "ENV_OPERATOR",
    "ENV_READ",
    "ENV_WEBHOOK",
    "MIN_TOKEN_LENGTH",
    "Principal",
    "Role",
    "Sessions",
    "TokenStore",
    "is_loopback",
]

ENV_OPERATOR = "STORNO_API_TOKENS"
ENV_READ = "STORNO_API_READ_TOKENS"
ENV_WEBHOOK = "STORNO_WEBHOOK_TOKENS"
MIN_TOKEN_LENGTH = 16
_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,64}$")


class Role(enum.StrEnum):
    """What a token allows. ``operate`` includes ``read`` and ``webhook``."""

    READ = "read"
    OPERATE = "operate"
    WEBHOOK = "webhook"

    def allows(self, wanted: Role) -> bool:
        if self is Role.OPERATE:
            return True
        return self is wanted


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made a request: the token's name (never the token) and its role."""

    name: str
    role: Role

    @property
    def can_operate(self) -> bool:
        return self.role is Role.OPERATE

    @property
    def can_read(self) -> bool:
        return self.role.allows(Role.READ)


OPEN = Principal("open-loopback", Role.OPERATE)
"""Everyone, when the server runs with ``--insecure-open`` (loopback only)."""


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(slots=True)
class TokenStore:
    """Known tokens by digest; ``open`` lets every request in as an operator."""

    tokens: dict[str, Principal] = field(default_factory=dict)
    open: bool = False
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))

    def add(self, token: str, role: Role, name: str | None = None, *, source: str = "") -> None:
        token = token.strip()
        where = f" in {source}" if source else ""
        what = {Role.OPERATE: "an operator", Role.READ: "a read-only", Role.WEBHOOK: "a webhook"}
        if len(token) < MIN_TOKEN_LENGTH:
            raise ConfigurationError(
                f"{what[role]} token{where} is {len(token)} characters long; use at least "
                f"{MIN_TOKEN_LENGTH} random characters (e.g. `python -c 'import secrets; "
                f"print(secrets.token_urlsafe(32))'`)"
            )
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ConfigurationError(f"{what[role]} token{where} holds spaces or control chars")
        digest = _digest(token)
        if name is None:
            name = f"{role.value}-{digest[:8]}"
        if not _NAME.match(name):
            raise ConfigurationError(
                f"token name {name!r}{where} must be 1-64 letters, digits or _.@+-"
            )
        known = self.tokens.get(digest)
        if known is not None and known.role is not role:
            raise ConfigurationError(
                f"the same token{where} is configured as {known.role.value} and {role.value}; "
                f"operator and read-only tokens must be distinct"
            )
        self.tokens[digest] = Principal(name, role)

    def add_list(self, text: str, role: Role, *, source: str) -> None:
        """Tokens separated by commas or whitespace, each ``TOKEN`` or ``NAME:TOKEN``."""
        for entry in re.split(r"[,\s]+", text.strip()):
            if not entry:
                continue
            name, sep, token = entry.partition(":")
            if sep and _NAME.match(name):
                self.add(token, role, name, source=source)
            else:
                self.add(entry, role, source=source)

    def add_file(self, path: Path) -> None:
        """A file of lines ``ROLE NAME TOKEN`` (ROLE: operate, read or webhook); ``#`` comments."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigurationError(f"cannot read the tokens file {str(path)!r}: {exc}") from exc
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{path}:{number}"
            if len(parts) != 3:
                raise ConfigurationError(
                    f"{where}: expected `ROLE NAME TOKEN` (ROLE operate, read or webhook), "
                    f"got {len(parts)} field(s)"
                )
            role_text, name, token = parts
            aliases = {"operator": "operate", "readonly": "read", "read-only": "read"}
            try:
                role = Role(aliases.get(role_text, role_text))
            except ValueError:
                raise ConfigurationError(
                    f"{where}: unknown role {role_text!r}; use operate, read or webhook"
                ) from None
            self.add(token, role, name, source=where)

    @classmethod
    def from_sources(
        cls,
        *,
        env: Mapping[str, str] | None = None,
        files: Iterable[Path] = (),
        open: bool = False,
    ) -> TokenStore:
        env = os.environ if env is None else env
        store = cls(open=open)
        for variable, role in ((ENV_OPERATOR, Role.OPERATE), (ENV_READ, Role.READ)):
            if env.get(variable, "").strip():
                store.add_list(env[variable], role, source=f"${variable}")
        if env.get(ENV_WEBHOOK, "").strip():
            store.add_list(env[ENV_WEBHOOK], Role.WEBHOOK, source=f"${ENV_WEBHOOK}")
        for path in files:
            store.add_file(path)
        return store

    @property
    def empty(self) -> bool:
        return not self.tokens

    def check(self, token: str | None) -> Principal | None:
        """The principal a presented token belongs to, or ``None``."""
        if self.open:
            return OPEN
        if not token:
            return None
        return self.tokens.get(_digest(token))

    def csrf(self, token: str | None) -> str:
        """A form token tied to the session's bearer token (or to open mode)."""
        basis = "open" if self.open or not token else _digest(token)
        return hmac.new(self.secret, basis.encode(), hashlib.sha256).hexdigest()[:40]

    def csrf_ok(self, token: str | None, presented: str | None) -> bool:
        return bool(presented) and hmac.compare_digest(self.csrf(token), presented or "")


@dataclass(slots=True)
class Sessions:
    """Dashboard sign-ins, kept on the server: the browser's cookie holds a random session
    id, never the token, and signing out forgets the session (a copied cookie is dead).

    Only digests of session ids are kept; sessions expire after ``max_age`` seconds and are
    lost when the server restarts (users sign in again).
    """

    max_age: float = 12 * 3600
    limit: int = 10_000
    _by_digest: dict[str, tuple[Principal, float]] = field(default_factory=dict)

    def start(self, principal: Principal) -> str:
        """A new session for ``principal``; returns the id for the cookie."""
        now = time.monotonic()
        if len(self._by_digest) >= self.limit:
            self._by_digest = {k: v for k, v in self._by_digest.items() if v[1] > now}
            while len(self._by_digest) >= self.limit:  # the oldest go first
                del self._by_digest[next(iter(self._by_digest))]
        session_id = secrets.token_urlsafe(32)
        self._by_digest[_digest(session_id)] = (principal, now + self.max_age)
        return session_id

    def check(self, session_id: str | None) -> Principal | None:
        """Who holds this session, or ``None`` if it is unknown, ended or expired."""
        if not session_id:
            return None
        found = self._by_digest.get(_digest(session_id))
        if found is None:
            return None
        principal, expires = found
        if time.monotonic() >= expires:
            del self._by_digest[_digest(session_id)]
            return None
        return principal

    def end(self, session_id: str | None) -> None:
        """Sign out: the session id is worth nothing from now on."""
        if session_id:
            self._by_digest.pop(_digest(session_id), None)


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
