"""Configuration: precedence (command line > YAML > preset > defaults), validation, run.json round trip."""

from __future__ import annotations

import json

import pytest

from wonderland.cli import build_parser
from wonderland.cli.train import resolve_config
from wonderland.config import PRESETS, GenerationConfig, TrainConfig, merge_config
from wonderland.errors import UserError
from wonderland.runs import RunDir


def parse(*argv: str):
    return build_parser().parse_args(["train", "--data", "d", *argv])


def test_defaults_when_nothing_is_given():
    assert resolve_config(parse()) == TrainConfig()


def test_command_line_beats_yaml_beats_preset_beats_defaults(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("# wonderland train --config c.yaml\niters: 33\nlr: 0.005\nmax-seq-len: 64\n")
    config = resolve_config(parse("--preset", "smoke", "--config", str(yaml_file), "--lr", "0.002"))
    assert config.lr == 0.002  # command line
    assert config.iters == 33 and config.max_seq_len == 64  # YAML (dash or underscore keys)
    assert config.batch_size == PRESETS["smoke"]["batch_size"] != TrainConfig().batch_size  # preset
    assert config.seed == TrainConfig().seed  # default


@pytest.mark.parametrize("yaml_text, message", [
    ("iters: [1, 2]\n", "c.yaml: iters must be an integer"),
    ("lr: .nan\n", "c.yaml: lr must be a finite number"),
    ("lr: .inf\n", "c.yaml: lr must be a finite number"),
    ("iters: .inf\n", "c.yaml: iters must be an integer"),
    ("lr:\n", "c.yaml: lr needs a value .got null."),
    ("batch_size: 1e9\n", "c.yaml: batch_size must be between 1 and 65536"),
    ("itrs: 5\n", "unknown option 'itrs'"),
    ("- just\n- a list\n", "expected a mapping"),
    ("iters: 5\n  bad: indent\n", "not valid YAML"),
])
def test_bad_yaml_is_a_user_error(tmp_path, yaml_text, message):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(yaml_text)
    with pytest.raises(UserError, match=message):
        resolve_config(parse("--config", str(yaml_file)))


@pytest.mark.parametrize("field, value, message", [
    ("rank", 0, "--rank must be between 1 and 4096 .got 0."), ("lr", -1.0, "--lr must be > 0 and <= 1 .got -1.0."),
    ("lr", 1e308, "--lr must be > 0 and <= 1"), ("lr", float("nan"), "--lr must be a finite number"),
    ("lr", float("inf"), "--lr must be a finite number"), ("iters", 0, "--iters must be between 1 and"),
    ("iters", 2.5, "--iters must be an integer"), ("batch_size", 0, "--batch-size must be between 1 and"),
    ("dropout", 1.0, "--dropout must be >= 0 and < 1"), ("schedule", "linear", "--schedule"),
    ("targets", " , ", "--targets"), ("lr", None, "--lr needs a value"), ("seed", -1, "--seed must be between 0"),
    ("alpha", True, "--alpha must be a finite number"),
])
def test_impossible_hyperparameters(field, value, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("top_p", 0), ("top_p", 1.01), ("temperature", -0.1), ("max_tokens", 0),
                                          ("repetition_penalty", 0)])
def test_generation_config_refuses_out_of_range(field, value):
    with pytest.raises(UserError, match="--" + field.replace("_", "-")):
        GenerationConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("temperature", 0), ("top_p", 1), ("max_tokens", 1)])
def test_generation_config_keeps_boundary_values(field, value):
    assert getattr(GenerationConfig(**{field: value}), field) == value
    assert GenerationConfig(**{field: value}) != GenerationConfig()


def test_alpha_is_peft_lora_alpha_and_scale_is_alpha_over_rank():
    config = merge_config(TrainConfig, {"rank": 4, "alpha": 32})
    assert config.scale == 8.0


def test_run_json_round_trip(tmp_path):
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    # "stopped": a "running" run with no training process holding its lock reads as "interrupted"
    info = {"schema_version": 1, "status": "stopped", "config": TrainConfig(iters=7).to_dict()}
    run.write(info)
    assert run.read() == info
    assert TrainConfig(**run.read()["config"]) == TrainConfig(iters=7)
    run.update(status="finished")
    assert run.read()["status"] == "finished" and "updated" in run.read()
    assert json.loads(run.run_json.read_text())["config"]["iters"] == 7


def test_every_numeric_field_has_bounds():
    from dataclasses import fields

    for cls in (TrainConfig, GenerationConfig):
        for f in fields(cls):
            if str(f.type) in ("int", "float"):
                assert "bounds" in f.metadata, f"{cls.__name__}.{f.name} has no bounds"
                assert "label" in f.metadata, f"{cls.__name__}.{f.name} has no label"


def test_web_naming_is_the_label_and_the_key_not_the_flag():
    from wonderland.config import form_name

    with pytest.raises(UserError) as e:
        merge_config(TrainConfig, {"lr": float("nan"), "batch_size": "x"}, source="", naming=form_name)
    assert str(e.value) == ("learning rate (lr) must be a finite number (got nan); "
                            "batch size (batch_size) must be an integer (got 'x')")


def test_command_line_numbers_are_checked_with_the_flag_named():
    for argv, message in [(["--lr", "nan"], "--lr must be a finite number"), (["--lr", "inf"], "--lr must be a finite"),
                          (["--warmup", "-1"], "--warmup must be between 0 and")]:
        with pytest.raises(UserError, match=message):
            resolve_config(parse(*argv))
