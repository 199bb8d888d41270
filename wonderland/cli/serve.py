"""``wonderland serve``: the web app (dataset, training with live progress, compare, runs)."""

from __future__ import annotations

import argparse
import secrets

from wonderland.web.security import is_loopback

HELP = "start the web app: build the dataset, train with a button, watch it learn, compare Base vs Trained"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from wonderland.web import DEFAULT_HOST, DEFAULT_PORT

    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to bind (default {DEFAULT_HOST}: this computer only); any other address requires a token")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--token", help="access token for a non-loopback --host (default: a random one, printed)")


def run(args: argparse.Namespace) -> int:
    from wonderland.web import create_app
    from wonderland.web.server import bind

    token = args.token
    if not is_loopback(args.host) and not token:
        token = secrets.token_urlsafe(24)
    app = create_app(host=args.host, token=token)
    server = bind(app, args.host, args.port)
    shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
    shown = f"[{shown}]" if ":" in shown else shown
    url = f"http://{shown}:{server.server_port}/" + (f"?token={token}" if token else "")
    print(f"wonderland web app: {url}", flush=True)
    if token:
        print("  reachable from other machines at this computer's address (same port and token); "
              "share the token only with people you trust", flush=True)
    print("  press Ctrl-C to stop", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.server_close()
    return 0
