"""Only this machine's own pages may talk to the local Prefect server: a foreign Host or Origin is refused.

Prefect's API has no Host check and answers any origin by default, so a web page open in a browser on the same
machine could start runs: cross-origin (``Origin: https://evil.example``) or through DNS rebinding (a name of the
attacker's that resolves to 127.0.0.1, sent as ``Host: evil.example``). Programs (the Prefect client, curl) send no
Origin and the server's own address as Host, and pass. Prefect's CORS setting only tells a browser whether it may
read a response; this refuses the request itself, before it reaches the API.
"""

from __future__ import annotations

import ipaddress
import json

LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host.strip("[]") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def own_addresses(host: str, port: int) -> tuple[frozenset[str], frozenset[str]]:
    """(the Host headers, the origins) of a server bound to ``host:port``: its address, and the loopback names
    when it listens on loopback."""
    names = {host, *LOOPBACK_NAMES} if is_loopback(host) else {host}
    hosts = frozenset(f"{name}:{port}" for name in names)
    return hosts, frozenset(f"http://{h}" for h in hosts) | frozenset(f"https://{h}" for h in hosts)


def refusal(host_header: str | None, origin: str | None, hosts: frozenset[str], origins: frozenset[str]) -> str | None:
    """Why a request is refused (None: it may pass). A missing Host is refused; a missing Origin is a program."""
    if not host_header or host_header.lower() not in hosts:
        return f"Host {host_header!r} is not this server (DNS rebinding?)"
    if origin is not None and origin.lower() not in origins:
        return f"Origin {origin!r} may not call this server"
    return None


class OwnOriginOnly:
    """ASGI middleware: HTTP requests and websockets with a foreign Host or Origin get 403 / a policy close."""

    def __init__(self, app, hosts: frozenset[str], origins: frozenset[str]) -> None:
        self.app, self.hosts, self.origins = app, hosts, origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        why = refusal(headers.get("host"), headers.get("origin"), self.hosts, self.origins)
        if why is None:
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008, "reason": why[:120]})
        body = json.dumps({"detail": f"refused: {why}"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 403,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
