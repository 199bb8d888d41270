"""A real browser against the real server: Debian's headless Chromium driven by Playwright.

Open the app, build the dataset from the default book, train (tiny model, a few steps) and see
the progress bar advance and the chart get points, stop, resume to the end, ask a prompt in
Compare and see streamed replies in every column (the Ollama column talks to the loopback
stand-in of test_web_ollama.py: no Ollama build can be installed here), a follow-up turn, the
Runs and Evaluation pages, delete. Screenshots of each page go to test-artifacts/.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from playwright.sync_api import sync_playwright

try:  # tests/ as a package or as a plain folder on sys.path (pytest's rootdir/prepend modes)
    from tests.helpers import NO_GUARD
    from tests.test_web_api import png_bytes
    from tests.test_web_ollama import FakeOllama
except ImportError:
    from helpers import NO_GUARD
    from test_web_api import png_bytes
    from test_web_ollama import FakeOllama
from wonderland.events import read_metrics
from wonderland.web import create_app
from wonderland.web.server import BackgroundServer

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Model output is text, never markup: this piece must show up literally and run nothing.
HOSTILE = "<img src=x onerror=\"window.pwned=1\">"
OLLAMA_REPLY = ["Tea-time ", "is ", "all ", "the time. ", HOSTILE]


@pytest.fixture
def browser_page():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1360, "height": 900}).new_page()
        page.set_default_timeout(30_000)
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
        yield page, problems
        browser.close()


def wait_until(page, expression: str, timeout_s: float = 30) -> None:
    """Poll a JS condition (Playwright's wait_for_function evals in the page, which the app's
    Content-Security-Policy forbids; page.evaluate goes through the debugger protocol instead)."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {expression}")
        page.wait_for_timeout(100)


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # a sticky header is drawn where the page was scrolled
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


# every element matching SEL lies horizontally within the window (nothing cut off or scrolled away)
IN_VIEW_X = ("[...document.querySelectorAll('SEL')].every(e => { const r = e.getBoundingClientRect(); "
             "return r.width > 0 && r.left >= 0 && r.right <= window.innerWidth + 1; })")
HOLD_AT_STEP = 6  # the first run waits here until Stop is pressed: it cannot finish before the click


def hold_training_until_stopped(monkeypatch) -> None:
    """The web worker's first (not resumed) run pauses after step HOLD_AT_STEP is delivered and
    goes on once the Stop button's request has set its stop flag: no race between Stop and the end."""
    import wonderland.train
    from wonderland.web.jobs import TrainingManager

    stopped = threading.Event()
    real_train, real_stop = wonderland.train.train, TrainingManager.stop

    def stop(self):
        job = real_stop(self)
        stopped.set()
        return job

    def train(config, data_dir=None, *, resume=None, subscribers=(), **kw):
        def hold(record):
            if resume is None and record["event"] == "step" and record["step"] == HOLD_AT_STEP:
                assert stopped.wait(timeout=120), "Stop was never pressed"
        return real_train(config, data_dir, resume=resume, subscribers=[*subscribers, hold], **kw)

    monkeypatch.setattr(TrainingManager, "stop", stop)
    monkeypatch.setattr(wonderland.train, "train", train)


def test_browser_build_train_compare_runs_eval(browser_page, tiny_model, alice_path, wl_home, monkeypatch):
    page, problems = browser_page
    monkeypatch.setenv("WONDERLAND_BOOK", str(alice_path))
    hold_training_until_stopped(monkeypatch)
    with FakeOllama(pieces=OLLAMA_REPLY) as fake, BackgroundServer(create_app(ollama_host=fake.host)) as url:
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']")
        assert page.locator("#dataset-empty").is_visible()

        # --- Dataset: build from the built-in book
        page.fill("#build-form [name=character]", "Hatter")
        page.click("#build-btn")
        page.wait_for_selector("#records-body tr")
        assert "Built" in page.inner_text("#build-msg")
        assert page.inner_text("#stat-grid").count("Hatter") >= 1
        assert page.locator("#attribution-bars .bar").count() >= 2 and "Hatter's lines" in page.text_content("#attribution-title")
        first_page = page.inner_text("#records-body")
        page.click("#next-page")
        wait_until(page, "document.querySelector('#page-info').textContent.startsWith('page 2')")
        assert page.inner_text("#records-body") != first_page
        shot(page, "web-dataset.png")

        # --- Train: tiny model, a few steps; watch progress and the chart; stop; resume to the end
        page.click("a[data-page=train]")
        page.wait_for_selector("#page-train:not([hidden])")
        assert page.input_value("#train-dataset") == "hatter"
        page.click("#presets button[data-preset=smoke]")
        page.click("details.group summary:has-text('monitoring')")  # collapsed by default
        page.click("details.group summary:has-text('advanced')")
        # kl 0, replay 0: the guard would first have the random tiny model answer replay prompts (one
        # per train record for the KL, ~80, or a quarter of them for the replay: minutes on 2 cores);
        # this test is about the page, not the guard. patience 0: the page follows all 40 steps (the
        # probe could stop the tiny model's run early)
        for name, value in {"model": str(tiny_model), "iters": "40", "batch_size": "2", "val_every": "5",
                            "patience": "0", "save_every": "0", "max_seq_len": "96", "threads": "1", "kl": "0", "replay": "0"}.items():
            page.fill(f"[name='cfg.{name}']", value)
        assert page.locator("#presets button.on").inner_text() == "custom"
        # the pre-flight memory estimate follows the form: the tiny model's, a fraction of a GB
        # (the embedded model's first: ~4 GB at the default batch; then the tiny model's, under 1 GB)
        wait_until(page, "Number(document.querySelector('#train-estimate').dataset.totalGb || 9) < 1")
        assert page.inner_text("#train-estimate").startswith("Memory: ~")
        assert page.eval_on_selector("#train-estimate", "e => e.dataset.fits") == "1"
        page.fill("#train-form [name=name]", "browser-run")
        page.click("#train-btn")
        wait_until(page, "Number(document.querySelector('#loss-chart').dataset.points || 0) >= 4")
        assert float(page.eval_on_selector("#progress-fill", "e => parseFloat(e.style.width)")) > 0
        assert page.locator("#job-pill.running").is_visible()
        assert "/ 40" in page.inner_text("#s-step")
        shot(page, "web-train-running.png")
        page.click("#stop-btn")
        page.wait_for_selector("#run-state.stopped")
        page.wait_for_selector("#resume-btn:not([hidden])")
        stopped_points = int(page.get_attribute("#loss-chart", "data-points"))
        stops = [r for r in read_metrics(wl_home / "runs" / "browser-run" / "metrics.jsonl") if r["event"] == "stopped"]
        assert len(stops) == 1 and 4 <= stops[0]["step"] <= HOLD_AT_STEP
        page.click("#resume-btn")
        # A second tab (same browser, same connection pool) picks the live run up where it is.
        tab2 = page.context.new_page()
        tab2.goto(url + "/#train")
        tab2.wait_for_selector("body[data-ready='1']")
        wait_until(tab2, f"Number(document.querySelector('#loss-chart').dataset.points || 0) > {stopped_points}")
        page.wait_for_selector("#run-state.finished", timeout=180_000)
        tab2.wait_for_selector("#run-state.finished")
        assert tab2.get_attribute("#loss-chart", "data-points") == page.get_attribute("#loss-chart", "data-points")
        tab2.close()
        assert page.inner_text("#progress-label").startswith("40 / 40")
        assert int(page.get_attribute("#loss-chart", "data-points")) > stopped_points
        assert page.locator("#train-log li").count() > 10 and "finished" in page.inner_text("#train-log")
        assert page.locator("#s-val").inner_text() != "–"
        shot(page, "web-train-finished.png")

        # A reload (or a second tab) replays the run from its events: same chart, same final state.
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector("#run-state.finished")
        wait_until(page, "Number(document.querySelector('#loss-chart').dataset.points || 0) > 40")

        # --- Compare: all four columns stream over one response; a follow-up keeps the conversation
        page.click("a[data-page=compare]")
        wait_until(page, "document.querySelector('#compare-run').value === 'browser-run'")
        page.wait_for_selector("#model-state.ready")
        # /api/ollama is asked when the page shows; its answer may land after the model is ready.
        wait_until(page, "document.querySelector('.column.ollama header').textContent.includes('llama3.1')")
        page.fill("[name='gen.max_tokens']", "12")
        page.click("#suggestions button:first-child")
        done = "document.querySelectorAll('.bubble.assistant').length === 4 && !document.querySelector('.bubble.pending')"
        wait_until(page, done)
        for column in ("base", "prompted", "trained", "ollama"):
            assert page.inner_text(f".column.{column} .bubble.assistant").strip(), column
        assert page.inner_text(".column.ollama .bubble.assistant") == "".join(OLLAMA_REPLY)
        assert page.locator(".column.ollama .bubble img").count() == 0
        assert page.evaluate("window.pwned") is None
        page.fill("#prompt", "And tomorrow?")
        page.press("#prompt", "Enter")
        wait_until(page, "document.querySelectorAll('.bubble.assistant').length === 8 && !document.querySelector('.bubble.pending')")
        follow_up = fake.requests[-1]["messages"]
        assert [m["role"] for m in follow_up] == ["system", "user", "assistant", "user"]
        assert follow_up[-1]["content"] == "And tomorrow?" and follow_up[2]["content"] == "".join(OLLAMA_REPLY).strip()
        shot(page, "web-compare.png")

        # --- Runs and Evaluation
        eval_dir = wl_home / "runs" / "browser-run" / "eval"
        eval_dir.mkdir()
        (eval_dir / "eval.json").write_text(json.dumps({  # the shape `wonderland eval` writes (abridged)
            "base": {"perplexity": 50.6, "persona_score": 0.02}, "prompted": {"perplexity": 31.2, "persona_score": 0.12},
            "trained": {"perplexity": 11.4, "persona_score": 0.31},
            "target": {"checks": [{"description": "held-out perplexity drops by >= 30%", "passed": True, "measured": "77%"}]}}))
        (eval_dir / "report.html").write_text("<h1>Evaluation of browser-run</h1><p>Perplexity fell from 50.6 to 11.4.</p>")
        (eval_dir / "perplexity.png").write_bytes(png_bytes())
        page.click("a[data-page=runs]")
        page.wait_for_selector("#runs-body tr[data-run=browser-run]")
        assert "finished" in page.inner_text("#runs-body") and page.locator("#runs-body svg polyline").count() >= 1
        wait_until(page, "Number(document.querySelector('#detail-chart').dataset.points || 0) > 40")
        shot(page, "web-runs.png")
        page.click("#runs-body tr[data-run=browser-run] button:has-text('Report')")
        page.wait_for_selector("#eval-body:not([hidden])")
        assert "11.4" in page.inner_text("#eval-summary table") and "PASS" in page.inner_text("#eval-summary .checks")
        assert page.frame_locator("#eval-report").locator("h1").inner_text() == "Evaluation of browser-run"
        page.wait_for_selector("#eval-images img")
        shot(page, "web-eval.png")

        # --- Narrow screen: the layout stacks instead of overflowing
        page.set_viewport_size({"width": 420, "height": 900})
        page.click("a[data-page=train]")
        page.wait_for_selector("#page-train:not([hidden])")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        shot(page, "web-train-narrow.png")
        # a 390 px phone: every tab, the Evaluation page and the Runs actions within the screen
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate(IN_VIEW_X.replace("SEL", ".tabs a"))
        page.click("a[data-page=eval]")
        page.wait_for_selector("#eval-body:not([hidden])")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        assert page.evaluate(IN_VIEW_X.replace("SEL", "#eval-summary table, #eval-report, #eval-images img"))
        shot(page, "web-eval-390.png")
        page.click("a[data-page=runs]")
        page.wait_for_selector("#runs-body tr[data-run=browser-run]")
        assert page.evaluate(IN_VIEW_X.replace("SEL", "#runs-body .row-actions button")), page.evaluate(
            "[...document.querySelectorAll('#runs-body .row-actions button, #runs-body td')].map(e => e.tagName + ':' + Math.round(e.getBoundingClientRect().left) + '-' + Math.round(e.getBoundingClientRect().right)).join(' ')")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        shot(page, "web-runs-390.png")

        # --- Delete with confirmation
        page.set_viewport_size({"width": 1360, "height": 900})
        page.click("a[data-page=runs]")
        page.once("dialog", lambda d: d.accept())
        page.click("#runs-body tr[data-run=browser-run] button:has-text('Delete')")
        page.wait_for_selector("#runs-empty:not([hidden])")
        assert not (wl_home / "runs" / "browser-run").exists()
    assert problems == []


def test_train_page_keeps_the_running_runs_values_buttons_and_name_message(browser_page, tiny_model, wl_home, monkeypatch):
    """At 1280x800: Train / Stop / Resume above the fold; a name refused by the browser's pattern
    check says why (and replaces a stale message); after a reload during a run the form shows that
    run's values, not the preset's."""
    from tests.test_web_api import write_dataset, write_nan_run

    page, problems = browser_page
    write_dataset(wl_home)
    hold_training_until_stopped(monkeypatch)
    write_nan_run(wl_home)  # NaN loss, lr Infinity: the page must still work and show it as failed
    page.set_viewport_size({"width": 1280, "height": 800})
    app = create_app()
    with BackgroundServer(app) as url:
        page.goto(url + "/#train")
        page.wait_for_selector("body[data-ready='1']")
        page.wait_for_selector("#page-train:not([hidden])")
        for button in ("#train-btn", "#stop-btn"):
            box = page.locator(button).bounding_box()
            assert box is not None and box["y"] + box["height"] <= 800, (button, box)
        page.evaluate("document.querySelector('#train-msg').textContent = 'Started an earlier run.'")
        page.fill("#train-form [name=name]", "bad name!")
        page.click("#train-btn")
        wait_until(page, "document.querySelector('#train-msg').textContent.includes('run name')")
        assert "Started" not in page.inner_text("#train-msg")

        config = {"model": str(tiny_model), "iters": 37, "batch_size": 2, "lr": 0.0042, "val_every": 0, "save_every": 0,
                  "max_seq_len": 96, "threads": 1, **NO_GUARD}
        r = app.test_client().post("/api/train", json={"dataset": "tiny", "name": "held", "config": config})
        assert r.status_code == 202, r.json
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        wait_until(page, "document.querySelector('#job-pill').classList.contains('running')")
        assert page.input_value("[name='cfg.iters']") == "37" and page.input_value("[name='cfg.lr']") == "0.0042"
        assert page.locator("#presets button.on").inner_text() == "custom"
        page.click("#stop-btn")
        page.wait_for_selector("#run-state.stopped")
        assert page.inner_text("#s-eta") == "–"
        # the page still works with the bad run in the list: it shows as failed
        page.click("a[data-page=runs]")
        page.wait_for_selector("#runs-body tr[data-run=nan-run]")
        assert page.inner_text("#runs-body tr[data-run=nan-run] .badge") == "failed"
        assert page.locator("#runs-body tr[data-run=held]").count() == 1
    assert problems == []
