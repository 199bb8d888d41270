"""Only the failures a user can fix become a one-line UserError; a bug keeps its traceback."""

from __future__ import annotations

import subprocess

import pytest

from wonderland.errors import UserError


@pytest.fixture
def no_cached_book(monkeypatch, tmp_path):
    monkeypatch.delenv("WONDERLAND_BOOK", raising=False)
    monkeypatch.setenv("WONDERLAND_HOME", str(tmp_path / "home"))


def test_a_failed_book_download_is_a_user_error(no_cached_book, monkeypatch):
    from wonderland.data import book

    def timeout():
        raise subprocess.TimeoutExpired(["pip", "download"], 600)

    monkeypatch.setattr(book, "_download_alice", timeout)
    with pytest.raises(UserError, match="no default book available.*--book PATH"):
        book.default_book_path()


def test_a_bug_in_the_book_download_is_not_hidden(no_cached_book, monkeypatch):
    from wonderland.data import book

    def bug():
        raise TypeError("unsupported operand")

    monkeypatch.setattr(book, "_download_alice", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        book.default_book_path()


def test_a_missing_hub_model_is_a_user_error(monkeypatch):
    import huggingface_hub

    from wonderland.models import resolve_model

    def offline(repo_id, **kw):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network and not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(UserError, match="could not fetch 'someone/no-such-model'.*no network"):
        resolve_model("someone/no-such-model", log=lambda m: None)


def test_a_bug_under_the_hub_download_is_not_hidden(monkeypatch):
    import huggingface_hub

    from wonderland.models import resolve_model

    def bug(repo_id, **kw):
        raise AttributeError("'NoneType' object has no attribute 'split'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", bug)
    with pytest.raises(AttributeError):
        resolve_model("someone/some-model", log=lambda m: None)
