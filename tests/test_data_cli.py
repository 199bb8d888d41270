"""`wonderland data`: defaults, options, refusal to clobber, bad input (exit 2, nothing written)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from wonderland.cli import main


def test_defaults_write_the_hatter_into_wonderland_home(alice_path, wl_home, monkeypatch, capsys):
    monkeypatch.setenv("WONDERLAND_BOOK", str(alice_path))
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    target = wl_home / "data" / "hatter"
    assert f"wrote {target}" in out and "the Hatter" in out and "train" in out
    stats = json.loads((target / "stats.json").read_text())
    assert stats["character"] == "Hatter" and stats["train_records"] > 30
    # a second run refuses to replace it without --overwrite, and leaves it alone
    before = (target / "train.jsonl").read_bytes()
    assert main(["data"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "--overwrite", "--seed", "3"]) == 0
    assert (target / "train.jsonl").read_bytes() != before
    assert sorted(p.name for p in target.parent.iterdir()) == ["hatter"]  # no staging leftovers


def test_options(alice_path, tmp_path, capsys):
    out = tmp_path / "king"
    rc = main(["data", "--book", str(alice_path), "--character", "King", "--out", str(out),
               "--valid-fraction", "0.2", "--seed", "7", "--no-persona"])
    assert rc == 0
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["character"], stats["seed"], stats["persona_records"]) == ("King", 7, 0)
    rc = main(["data", "--book", str(alice_path), "--out", str(tmp_path / "hatter"), "--persona-share", "0.2"])
    assert rc == 0
    stats = json.loads((tmp_path / "hatter" / "stats.json").read_text())
    assert stats["persona_share"] == 0.2 and 0 < stats["persona_records"] <= 0.2 * stats["dialogue_records"]
    assert main(["data", "--book", str(alice_path), "--out", str(tmp_path / "bad"), "--persona-share", "-1"]) == 2
    assert "persona share" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_list_characters(alice_path, capsys):
    assert main(["data", "--book", str(alice_path), "--list-characters"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "Alice" and any(l.split()[0] == "Hatter" for l in lines)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" * 10, "binary"),
    ("`Caf\u00e9,' said the Hatter.".encode("cp1252"), "not valid UTF-8"),
    (b"Narration only.\n\nStill no dialogue.\n", "no quoted dialogue"),
    (b"  `Hello,' said Alice.\n\n  `Hi,' said the Dodo.\n", "'Hatter' never speaks.*Alice"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, content, message):
    book = tmp_path / "book.txt"
    book.write_bytes(content)
    out = tmp_path / "out"
    assert main(["data", "--book", str(book), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wonderland data: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["book.txt"]


def test_missing_book_and_bad_out(tmp_path, capsys):
    assert main(["data", "--book", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "book not found" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    book = tmp_path / "b.txt"
    book.write_text("`Hello,' said Alice.\n")
    assert main(["data", "--book", str(book), "--character", "Alice", "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


def test_subprocess_entry_point(alice_path, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "wonderland", "data", "--book", str(alice_path), "--character",
                           "Nobody", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert proc.returncode == 2 and "never speaks" in proc.stderr and "Traceback" not in proc.stderr


def test_default_book_lookup(tmp_path, monkeypatch, wl_home):
    from wonderland.data import book as bookmod
    from wonderland.data import default_book_path
    from wonderland.errors import UserError

    monkeypatch.setenv("WONDERLAND_BOOK", str(tmp_path / "missing.txt"))
    with pytest.raises(UserError, match="WONDERLAND_BOOK"):
        default_book_path()
    monkeypatch.delenv("WONDERLAND_BOOK")

    def offline():
        raise OSError("network is unreachable")

    monkeypatch.setattr(bookmod, "_download_alice", offline)
    with pytest.raises(UserError, match="no default book available.*--book"):
        default_book_path()
    assert main(["data", "--out", str(tmp_path / "o")]) == 2
    cached = wl_home / "books" / "alice.txt"
    cached.parent.mkdir(parents=True)
    cached.write_text("`Hello,' said the Hatter.\n")
    assert default_book_path() == cached


def test_data_layer_has_no_ml_imports():
    code = ("import sys, wonderland.data, wonderland.cli.data; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy', 'peft')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
