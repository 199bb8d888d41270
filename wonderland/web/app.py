"""The Flask app factory: pages, JSON API blueprints, security checks, shared state."""

from __future__ import annotations

from dataclasses import dataclass, field

from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from wonderland import __version__
from wonderland.errors import UserError
from wonderland.web import api_export, api_runs, api_train, compare, datasets, openai_api
from wonderland.web.common import ApiError, StrictJSONProvider
from wonderland.web.compare import ModelCache
from wonderland.web.jobs import TrainingManager
from wonderland.web.ollama import ollama_host as default_ollama_host
from wonderland.web.security import Guard

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860  # not 5000: macOS's AirPlay Receiver holds that one on the target users' Macs
PAGES = ("dataset", "train", "compare", "runs", "eval")


@dataclass
class WebState:
    """What the requests of one app share: the training job, the loaded models, where Ollama is."""

    guard: Guard
    ollama_host: str
    jobs: TrainingManager = field(default_factory=TrainingManager)
    models: ModelCache = field(default_factory=ModelCache)


def create_app(*, host: str = DEFAULT_HOST, token: str | None = None, ollama_host: str | None = None) -> Flask:
    """The web app. ``host`` is the address the server binds (it decides which Host headers are
    accepted); ``token``, required off loopback, guards every request; ``ollama_host`` defaults
    to ``$OLLAMA_HOST``."""
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    # Largest request body: a book upload (plus form overhead); Flask answers 413 beyond it.
    app.config["MAX_CONTENT_LENGTH"] = datasets.MAX_BOOK_BYTES + 64 * 1024
    app.json.sort_keys = False
    state = WebState(guard=Guard.for_bind(host, token), ollama_host=default_ollama_host(ollama_host))
    app.extensions["wonderland"] = state
    state.guard.install(app)

    for bp in (datasets.bp, api_train.bp, api_runs.bp, api_export.bp, compare.bp, openai_api.bp):
        app.register_blueprint(bp)

    @app.get("/")
    def index():
        return render_template("index.html", version=__version__, pages=PAGES)

    @app.get("/api/health")
    def health():
        job = state.jobs.job
        return jsonify(ok=True, version=__version__, training=bool(job and job.active))

    @app.errorhandler(ApiError)
    def _api_error(e: ApiError):
        return jsonify(error=e.message), e.status

    @app.errorhandler(UserError)
    def _user_error(e: UserError):  # e.g. a corrupt run.json read by a route: the user can fix it
        return jsonify(error=str(e)), 400

    @app.errorhandler(413)
    def _too_large(e):
        if request.path.startswith("/v1/"):
            return openai_api.http_error(e)
        limit = datasets.MAX_BOOK_BYTES // 2**20
        return jsonify(error=f"upload too large: the limit is {limit} MiB (a whole novel is ~0.2-5 MiB of text)"), 413

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException):
        if request.path.startswith("/v1/"):  # OpenAI clients read {"error": {"message", "type", ...}}
            return openai_api.http_error(e)
        if request.path.startswith("/api/"):
            return jsonify(error=f"{e.name}: {e.description}"), e.code
        return e

    return app
