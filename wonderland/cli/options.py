"""Argparse options generated from the config dataclasses, so CLI, YAML and run.json agree."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from wonderland.config import GenerationConfig, TrainConfig, check_fields, flag_name

_TYPES = {"int": int, "float": float, "str": str}


def add_dataclass_options(parser: argparse.ArgumentParser, cls: type, title: str, skip: tuple[str, ...] = (),
                          prefix: str = "") -> None:
    """One ``--field-name`` option per dataclass field; default None so YAML/presets can fill in."""
    group = parser.add_argument_group(title)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + prefix + f.name.replace("_", "-")
        kw: dict[str, Any] = {"type": _TYPES[str(f.type)], "default": None, "dest": prefix.replace("-", "_") + f.name,
                              "help": f"{f.metadata['help']} (default: {f.default})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        group.add_argument(flag, **kw)


def dataclass_overrides(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The options the user actually gave on the command line, checked against the field bounds
    (a UserError naming the flag, e.g. ``--lr must be > 0 and <= 1 (got nan)``)."""
    out = {}
    for f in fields(cls):
        value = getattr(args, prefix.replace("-", "_") + f.name, None)
        if value is not None:
            out[f.name] = value
    return check_fields(cls, out, lambda name, _cls: flag_name(prefix + name))


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    add_dataclass_options(parser, GenerationConfig, "generation")


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    return GenerationConfig(**dataclass_overrides(args, GenerationConfig))


def add_train_options(parser: argparse.ArgumentParser) -> None:
    add_dataclass_options(parser, TrainConfig, "training")
