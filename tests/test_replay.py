"""The retention guard's data (wonderland/replay.py) and the checkpoint probe's rule (wonderland/probe.py)."""

from __future__ import annotations

import json
import re

import pytest

from wonderland import replay
from wonderland.eval.evaluate import DEFAULT_PROMPTS, load_prompts
from wonderland.eval.metrics import RETENTION_FILE, load_retention
from wonderland.probe import MAX_DRIFT, best

EVAL_DIR = DEFAULT_PROMPTS.parent


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def test_replay_prompts_are_many_and_disjoint_from_every_evaluation_prompt():
    prompts = replay.load_prompts()
    assert len(prompts) >= 200 and len({norm(p) for p in prompts}) == len(prompts)
    held_out = {norm(p) for p in load_prompts(DEFAULT_PROMPTS) + load_prompts(EVAL_DIR / "prompts-selection.txt")}
    held_out |= {norm(i.prompt) for f in (RETENTION_FILE, EVAL_DIR / "retention-selection.txt") for i in load_retention(f)}
    assert not {norm(p) for p in prompts} & held_out


def test_report_and_selection_sets_do_not_overlap():
    assert not {norm(p) for p in load_prompts(DEFAULT_PROMPTS)} & {norm(p) for p in load_prompts(EVAL_DIR / "prompts-selection.txt")}
    report = {norm(i.prompt) for i in load_retention(RETENTION_FILE)}
    assert len(report) >= 40 and not report & {norm(i.prompt) for i in load_retention(EVAL_DIR / "retention-selection.txt")}


def test_probe_prompts_are_never_drawn_for_training():
    train, probe = replay.split(replay.load_prompts())
    assert len(probe) >= 15 and not set(train) & set(probe)
    drawn = replay.draw(train, 3 * len(train) + 5, seed=1)
    assert set(drawn) == set(train) and len(drawn) == 3 * len(train) + 5
    assert replay.draw(train, 10, seed=1) == drawn[:10]  # seeded


def test_mix_keeps_every_record_and_the_records_carry_the_characters_prompt():
    answers = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(5)] + [{"prompt": "empty", "answer": ""}]
    recs = replay.records(answers, "You are the Hatter.")
    assert len(recs) == 5 and all(r["messages"][0]["content"] == "You are the Hatter." for r in recs)
    character = [{"messages": [], "id": i} for i in range(7)]
    mixed = replay.mix(character, recs, seed=0)
    assert sorted(map(id, mixed)) == sorted(map(id, character + recs)) and mixed != character + recs


def test_prompt_sections_split_the_prompts_and_a_closed_pool_holds_no_probe_prompt():
    closed, open_ = replay.load_prompts(section="closed"), replay.load_prompts(section="open")
    assert len(closed) >= 150 and len(open_) >= 30 and not set(closed) & set(open_)
    assert sorted(closed + open_) == sorted(replay.load_prompts())
    pool, probe = replay.pool("closed"), replay.split(replay.load_prompts())[1]
    assert set(pool) <= set(closed) and not set(pool) & set(probe) and len(pool) > 0.8 * len(closed)
    assert set(replay.pool("all")) == set(replay.split(replay.load_prompts())[0])


def test_first_sentence_answers_and_records_without_one_are_left_out():
    assert replay.first_sentence("The capital is Paris. It is big.") == "The capital is Paris."
    assert replay.first_sentence("Paris is the capital\n\nMore text.") == "Paris is the capital"
    assert replay.first_sentence("Here is how to do it:\n1. Boil") == ""  # a lead-in, not an answer
    assert replay.first_sentence("Yes.") == ""  # under 3 words
    answers = [{"prompt": "a", "answer": "It is 4. Because two and two."}, {"prompt": "b", "answer": "Steps:\nOne"}]
    recs = replay.records(answers, "sys", answer="first")
    assert [r["messages"][-1]["content"] for r in recs] == ["It is 4."]
    assert [r["messages"][-1]["content"] for r in replay.records(answers, "sys")] == ["It is 4. Because two and two.", "Steps:\nOne"]


def test_trim_keeps_whole_answers_and_cuts_a_cut_off_one_at_its_last_sentence():
    assert replay.trim(" Paris is the capital. It is big ", finished=True) == "Paris is the capital. It is big"
    assert replay.trim("Paris is the capital. It is big and", finished=False) == "Paris is the capital."


def test_the_packaged_answers_cover_every_prompt():
    rows = replay.read_answers(replay.PACKAGED["smollm2-135m-instruct"])
    assert set(rows) == set(replay.load_prompts()) and all(rows.values())


def test_the_embedded_model_converts_to_the_weights_the_packaged_answers_were_made_for(embedded_model):
    # The conversion reuses gguf's parse between transformers' three reads (models.gguf_parsed_once):
    # its weights must stay byte-identical, or every demo would regenerate the 240 answers.
    from wonderland.models import weights_sha256

    assert weights_sha256(embedded_model) == _packaged_sha256()


def _packaged_sha256() -> str:
    return json.loads(replay.PACKAGED["smollm2-135m-instruct"].read_text(encoding="utf-8").splitlines()[0])["model_sha256"]


def _no_model():
    raise AssertionError("the base model was asked for answers")


def test_the_packaged_answers_are_found_by_weights_whatever_the_model_is_called(tmp_path):
    prompts = replay.load_prompts()[:3]
    rows = replay.answers_for("/some/folder/of/it", tmp_path, _packaged_sha256(), _no_model, prompts=prompts)
    packaged = replay.read_answers(replay.PACKAGED["smollm2-135m-instruct"])
    assert rows == [{"prompt": q, "answer": packaged[q]} for q in prompts]


def test_a_backend_without_a_probe_needs_no_answers_for_it(tmp_path):
    from wonderland.config import TrainConfig

    config = TrainConfig(model="tiny", replay=0, kl=0)
    character = [{"messages": [], "id": i} for i in range(4)]
    mixed, kl_records, probe = replay.guard(config, tmp_path, "not-a-packaged-model", character, character[:1],
                                            "You are the Hatter.", _no_model, log=lambda m: None, with_probe=False)
    assert (mixed, kl_records, probe) == (character, [], None)


def test_best_checkpoint_rule():
    rows = [{"step": 10, "persona_margin": 0.5, "retention_drift": 0.1},
            {"step": 20, "persona_margin": 0.9, "retention_drift": MAX_DRIFT + 0.01},  # voice, but forgets
            {"step": 30, "persona_margin": 0.7, "retention_drift": MAX_DRIFT}]
    assert best(rows)["step"] == 30
    assert best([{**r, "retention_drift": 1.0 + r["step"] / 100} for r in rows])["step"] == 10  # none ok: least drift
    assert best([{"step": 5, "persona_margin": None, "retention_drift": None}]) is None


@pytest.mark.parametrize("value", [-0.5, 10.5, float("nan")])
def test_replay_ratio_out_of_range_exits_2(value, tmp_path, capsys):
    from wonderland.cli import main

    assert main(["train", "--data", str(tmp_path), "--replay", str(value)]) == 2
    err = capsys.readouterr().err
    assert "--replay" in err and "Traceback" not in err and not (tmp_path / "runs").exists()
