"""The web app: build a dataset, train with a button, watch it learn live, compare the arms.

Only wonderland's own API is used here (train, load_run, data.build_dataset, runs, events):
this package never imports torch or mlx itself. Start it with ``wonderland serve``.
"""

from wonderland.web.app import DEFAULT_HOST, DEFAULT_PORT, create_app

__all__ = ["create_app", "DEFAULT_HOST", "DEFAULT_PORT"]
