"""Two checks on every request before it is routed: the host name in open mode, and run ids
whose slashes came percent-encoded.

- ``LoopbackHosts``: a server run with ``--insecure-open`` lets everyone in as an operator,
  which is safe only if only this machine can reach it. Binding to loopback is not enough:
  a web page can point its own host name at 127.0.0.1 (DNS rebinding) and drive the API from
  the browser. Such requests carry that foreign name in ``Host``, so only loopback names are
  answered.
- ``EncodedSlashes``: run ids may hold ``/`` (child runs are ``parent/3``), which makes
  ``/api/v1/runs/rs/state`` ambiguous. A client that encodes the slash (``rs%2Fstate``) means
  one path segment; the router only sees the decoded path, so such a slash is handed on as
  :data:`SLASH` and turned back into ``/`` where the run id is read (:func:`run_id_of`).
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from starlette.types import ASGIApp, Receive, Scope, Send

from storno._server._auth import is_loopback
from storno._server._errors import error_response

__all__ = ["SLASH", "EncodedSlashes", "LoopbackHosts", "run_id_of"]

SLASH = "\x00"
"""An encoded slash inside a path segment, as the routes see it (no valid id holds a NUL)."""

_ENCODED_SLASH = re.compile(rb"%2f", re.IGNORECASE)


def run_id_of(value: str) -> str:
    """A run id from a path parameter: encoded slashes become slashes again."""
    return value.replace(SLASH, "/")


def _host_name(header: str) -> str:
    """The host name of a ``Host`` header, without its port: ``[::1]:80`` -> ``::1``."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class LoopbackHosts:
    """In open mode, refuses (403) a request whose ``Host`` is not a loopback name."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = ""
            for name, value in scope.get("headers", []):
                if name == b"host":
                    header = value.decode("latin-1").strip()
                    break
            if not is_loopback(_host_name(header)):
                response = error_response(
                    403,
                    "forbidden_host",
                    f"this server runs open (--insecure-open) and answers only to loopback "
                    f"host names (localhost, 127.0.0.1, [::1]), not {header!r}: a page on "
                    f"another site must not reach it through its own host name",
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class EncodedSlashes:
    """Keeps a percent-encoded slash inside its path segment (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and _ENCODED_SLASH.search(raw) and b"%00" not in raw:
            path = raw.split(b"?", 1)[0].decode("latin-1")
            parts = [unquote(part) for part in re.split("%2[fF]", path)]
            scope = {**scope, "path": SLASH.join(parts)}
        await self.app(scope, receive, send)
