"""Serving the app: werkzeug's threaded WSGI server, one thread per connection.

Server-sent events hold a connection (and so a thread) for as long as a page is open, so a
fixed worker pool (waitress' default is 4 threads) would stall after a few tabs. The threaded
server has no pool to exhaust: 100 concurrent listeners are 100 mostly-sleeping threads.
"""

from __future__ import annotations

import errno
import threading

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from wonderland.errors import UserError


def bind(app: Flask, host: str, port: int) -> BaseWSGIServer:
    """A started-listening (not yet serving) threaded server; ``port=0`` picks a free port."""
    try:
        return make_server(host, port, app, threaded=True)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


class BackgroundServer:
    """The real server in a daemon thread (tests, notebooks): ``with BackgroundServer(app) as url: ...``."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = bind(app, host, port)
        self.url = f"http://{host}:{self.server.server_port}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                        daemon=True, name="wonderland-web")

    def __enter__(self) -> str:
        self._thread.start()
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
