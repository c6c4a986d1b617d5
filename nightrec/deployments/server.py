"""The Prefect server `nightrec serve` starts: Prefect's own app (API, UI, scheduler) behind :class:`OwnOriginOnly`.

Run as ``python -m nightrec.deployments.server --host H --port P`` (what ``prefect server start`` does, plus the
Host/Origin check); :func:`server_environment` is the environment it needs.
"""

from __future__ import annotations

import argparse

from nightrec.deployments.guard import is_loopback, own_addresses

AUTH_SETTING = "PREFECT_SERVER_API_AUTH_STRING"


def server_environment(host: str, port: int, environ: dict[str, str]) -> dict[str, str]:
    """The server's settings: CORS and CSRF for its own origin only; refuses a non-loopback address without the
    basic-auth string (``user:password`` in PREFECT_SERVER_API_AUTH_STRING)."""
    if host in ("0.0.0.0", "::", ""):
        raise ValueError(f"serve host {host!r}: give the address clients use (the Host header is checked against it)")
    if not is_loopback(host) and not environ.get(AUTH_SETTING):
        raise ValueError(
            f"refusing to serve the Prefect API on {host} (not loopback) without authentication: set {AUTH_SETTING} "
            "to 'user:password' (clients then need PREFECT_API_AUTH_STRING, set for you by nightrec serve)"
        )
    _, origins = own_addresses(host, port)
    return {
        "PREFECT_SERVER_API_HOST": host,
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
        "PREFECT_SERVER_CORS_ALLOWED_ORIGINS": ",".join(sorted(origins)),
        "PREFECT_SERVER_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    args = parser.parse_args(argv)
    import uvicorn
    from prefect.server.api.server import create_app

    from nightrec.deployments.guard import OwnOriginOnly

    hosts, origins = own_addresses(args.host, args.port)
    app = OwnOriginOnly(create_app(final=True), hosts, origins)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
