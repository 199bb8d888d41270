"""The bounded model cache (wonderland.generate.ModelCache) and one shared base per model:
LRU by count and bytes, per-key locks, runs attached to one base copy by name, delete evicts."""

from __future__ import annotations

import threading

import pytest

from tests.helpers import NO_GUARD, write_dataset
from wonderland.generate import ModelCache


def test_lru_by_count_and_by_bytes():
    cache = ModelCache(max_models=2)
    for key in ("a", "b"):
        cache.get((key,), lambda key=key: (key.upper(), 1))
    assert cache.get(("a",), lambda: pytest.fail("a is cached")) == "A"  # a is now the most recent
    cache.get(("c",), lambda: ("C", 1))
    assert cache.keys() == [("a",), ("c",)]  # b, the least recently used, went

    cache = ModelCache(max_models=10, max_bytes=100)
    cache.get(("x",), lambda: ("X", 60))
    cache.get(("y",), lambda: ("Y", 30))
    cache.get(("z",), lambda: ("Z", 30))
    assert cache.keys() == [("y",), ("z",)]
    cache.get(("huge",), lambda: ("H", 500))  # larger than the limit alone: kept (it was asked for), the rest go
    assert cache.keys() == [("huge",)]


def test_loads_of_different_keys_do_not_wait_on_each_other_and_one_key_loads_once():
    cache, b_started, calls = ModelCache(), threading.Event(), []

    def load_a():
        calls.append("a")
        assert b_started.wait(timeout=30), "the load of b waited for the load of a"
        return "A", 1

    def load_b():
        calls.append("b")
        b_started.set()
        return "B", 1

    results = {}
    threads = [threading.Thread(target=lambda: results.setdefault("a1", cache.get(("a",), load_a))),
               threading.Thread(target=lambda: results.setdefault("a2", cache.get(("a",), load_a)))]
    for t in threads:
        t.start()
    results["b"] = cache.get(("b",), load_b)
    for t in threads:
        t.join(timeout=60)
    assert results == {"a1": "A", "a2": "A", "b": "B"} and calls.count("a") == 1


def test_evict_drops_matching_keys_and_a_base_takes_its_runs_along():
    class Loaded:
        def __init__(self, base_key=None):
            self.base_key = base_key

    cache = ModelCache(max_models=10)
    base = ("base", "torch", "/m", "cpu")
    cache.get(base, lambda: (object(), 100))
    cache.get(("run", "/r1"), lambda: (Loaded(base), 1))
    cache.get(("run", "/r2"), lambda: (Loaded(base), 1))
    assert cache.evict(lambda k: k == ("run", "/r1")) == 1 and ("run", "/r1") not in cache.keys()
    cache.evict(lambda k: k == base)
    assert cache.keys() == []


@pytest.fixture
def two_runs(tmp_path, tiny_model, monkeypatch):
    from wonderland.config import TrainConfig
    from wonderland.train import train

    dataset = write_dataset(tmp_path / "data")
    runs = []
    for name, seed in (("first", 0), ("second", 1)):
        config = TrainConfig(model=str(tiny_model), iters=2, batch_size=2, lr=0.05, seed=seed, val_every=0, save_every=0,
                             **NO_GUARD)
        runs.append(train(config, dataset, name=name, log=lambda m: None))
    return runs, dataset


def test_runs_on_one_base_share_its_weights_and_score_as_if_loaded_alone(two_runs, tiny_model, monkeypatch):
    import json

    from wonderland import generate
    from wonderland.backends import get_backend

    monkeypatch.setattr(generate, "MODELS", ModelCache(max_models=10))
    (first, second), dataset = two_runs
    a, b = generate.load_run(first, device="cpu"), generate.load_run(second, device="cpu")
    base = generate.load_base(tiny_model, "torch", "cpu")
    assert a.model.model is b.model.model is base.model  # one copy of the base weights
    assert a.model.adapter_name != b.model.adapter_name
    records = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()][:2]
    for run, view in ((first, a.model), (second, b.model)):
        alone = get_backend("torch").load(tiny_model, run.adapter, device="cpu")
        assert view.loss(records) == pytest.approx(alone.loss(records), rel=1e-6, abs=1e-6)
        assert view.loss(records, adapter=False) == pytest.approx(alone.loss(records, adapter=False), rel=1e-6, abs=1e-6)
        # code that calls the model directly (export's verify) gets this run's adapter, not the last one used
        import torch

        ids = torch.tensor([[5, 6, 7, 8]])
        with torch.no_grad():
            assert torch.equal(view.model(input_ids=ids).logits, alone.model(input_ids=ids).logits)
    plain = get_backend("torch").load(tiny_model, device="cpu")
    assert base.loss(records) == pytest.approx(plain.loss(records), rel=1e-6, abs=1e-6)  # the base view runs no adapter
    assert a.model.loss(records) != b.model.loss(records)


def test_a_run_under_a_dotted_path_loads(tmp_path, tiny_model, monkeypatch):
    """The default home is ~/.cache/wonderland: a run's path has dots, PEFT's adapter name may not."""
    from wonderland import generate
    from wonderland.config import TrainConfig
    from wonderland.train import train

    monkeypatch.setattr(generate, "MODELS", ModelCache(max_models=10))
    config = TrainConfig(model=str(tiny_model), iters=1, batch_size=2, val_every=0, save_every=0, **NO_GUARD)
    run = train(config, write_dataset(tmp_path / "data"), out=str(tmp_path / ".cache" / "run.v1"), log=lambda m: None)
    loaded = generate.load_run(run, device="cpu")
    assert "." not in loaded.model.adapter_name and loaded.model.adapter_name in loaded.model.model.peft_config


def test_deleting_a_run_in_the_web_app_evicts_it(two_runs, monkeypatch):
    from wonderland import generate
    from wonderland.web import create_app

    monkeypatch.setattr(generate, "MODELS", ModelCache(max_models=10))
    (first, _), _ = two_runs
    generate.load_run(first)
    assert [k for k in generate.MODELS.keys() if k[0] == "run"] != []
    client = create_app().test_client()
    assert client.delete("/api/runs/first?confirm=first").status_code == 200
    assert [k for k in generate.MODELS.keys() if k[0] == "run" and k[1] == str(first.path)] == []


def test_adapters_are_switched_only_when_a_step_asks_for_the_other_state(two_runs, tiny_model, monkeypatch):
    """Switching walks every LoRA module, so it happens only on a change of state (a Base reply is
    one switch off and one back on, not two per token), and every step still runs what it asks for:
    after another run's view, after PEFT's own ``disable_adapter()`` context, and a direct call (also
    inside PEFT's context) after a Base reply."""
    import json

    import torch

    from wonderland import generate
    from wonderland.backends import get_backend
    from wonderland.config import GenerationConfig

    monkeypatch.setattr(generate, "MODELS", ModelCache(max_models=10))
    (first, second), dataset = two_runs
    a, b = generate.load_run(first, device="cpu").model, generate.load_run(second, device="cpu").model
    base = generate.load_base(tiny_model, "torch", "cpu")
    records = [json.loads(line) for line in (dataset / "train.jsonl").read_text().splitlines()][:2]
    torch_backend = get_backend("torch")
    alone_a, alone_b = (torch_backend.load(tiny_model, r.adapter, device="cpu") for r in (first, second))
    plain = torch_backend.load(tiny_model, device="cpu")
    want = {"a": alone_a.loss(records), "b": alone_b.loss(records), "off": plain.loss(records)}

    peft_model = a._model
    switches = []
    for name in ("disable_adapter_layers", "enable_adapter_layers"):
        original = getattr(peft_model.base_model, name)
        monkeypatch.setattr(peft_model.base_model, name, lambda f=original, n=name: (switches.append(n), f())[1])
    messages = [{"role": "user", "content": "Hello"}]
    sampled = GenerationConfig(temperature=1.0, top_p=1.0, max_tokens=6, seed=1)
    list(a.stream(messages, sampled, adapter=False))  # a Base reply of several tokens: off once, on at its end
    assert switches == ["disable_adapter_layers", "enable_adapter_layers"]
    for view, on, key in [(a, False, "off"), (a, True, "a"), (b, True, "b"), (base, True, "off"), (a, False, "off"), (b, True, "b")]:
        assert view.loss(records, adapter=on) == pytest.approx(want[key], rel=1e-6, abs=1e-6), (view.adapter_name, on)
    with peft_model.disable_adapter():  # PEFT switches them back on when it leaves
        pass
    assert a.loss(records, adapter=False) == pytest.approx(want["off"], rel=1e-6, abs=1e-6)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():  # a direct call after a Base step: this run's adapter, switched on
        assert torch.equal(a.model(input_ids=ids).logits, alone_a.model(input_ids=ids).logits)
        with a.model.disable_adapter():  # and PEFT's own context still turns it off
            assert torch.equal(a.model(input_ids=ids).logits, plain.model(input_ids=ids).logits)
