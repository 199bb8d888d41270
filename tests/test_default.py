"""One default: `wonderland train` with no preset, `wonderland demo` and the web Train form train the
same configuration; presets are named by what they do and the old names stay as aliases."""

from __future__ import annotations

import argparse

import pytest

from wonderland.cli import demo as demo_cli
from wonderland.cli import train as train_cli
from wonderland.config import PRESETS, TrainConfig, merge_config, preset
from wonderland.errors import UserError


def _args(module, argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    module.add_arguments(p)
    return p.parse_args(argv)


def test_train_demo_and_web_form_share_one_default(tmp_path):
    from wonderland.web import create_app

    train_default = train_cli.resolve_config(_args(train_cli, ["--data", str(tmp_path)]))
    demo_args = _args(demo_cli, [])
    demo_default = merge_config(TrainConfig, preset(demo_args.preset))
    schema = create_app().test_client().get("/api/config").get_json()
    web_default = merge_config(TrainConfig, {f["name"]: f["default"] for f in schema["train"]},
                               schema["presets"][schema["default_preset"]])
    assert train_default == demo_default == web_default == TrainConfig()
    assert TrainConfig().kl > 0 and TrainConfig().val_every > 0  # the measured retention guard and probe are on


def test_presets_are_named_by_what_they_do_and_old_names_are_aliases():
    assert set(PRESETS) == {"default", "attention-only", "smoke"}
    assert preset("quick") == preset("default") == {}
    assert preset("quality") == preset("attention-only") == {"targets": "q_proj,k_proj,v_proj,o_proj"}
    with pytest.raises(UserError, match="unknown preset 'fast'"):
        preset("fast")
