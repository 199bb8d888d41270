"""--quantize (issue 18): the option on every entry point, and what each backend refuses (exit 2, one line)."""

from __future__ import annotations

import pytest

from tests.helpers import write_dataset
from wonderland.cli import build_parser, main
from wonderland.cli.train import resolve_config
from wonderland.config import TrainConfig, load_yaml, merge_config
from wonderland.errors import UserError
from wonderland.quantize import NF4_NEEDS


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "data")


def test_quantize_on_the_command_line_yaml_and_the_web_schema(tmp_path):
    assert TrainConfig().quantize == "none"
    args = build_parser().parse_args(["train", "--data", "d", "--quantize", "4"])
    assert resolve_config(args).quantize == "4"
    yaml_file = tmp_path / "q.yaml"
    yaml_file.write_text("quantize: 8\n")  # a YAML number is the choice "8"
    assert merge_config(TrainConfig, load_yaml(yaml_file)).quantize == "8"
    with pytest.raises(UserError, match="quantize must be one of none, 4, 8, nf4"):
        merge_config(TrainConfig, {"quantize": "3"})
    with pytest.raises(SystemExit):  # argparse's choices
        build_parser().parse_args(["train", "--data", "d", "--quantize", "2"])

    from wonderland.web import create_app

    schema = create_app().test_client().get("/api/config").json
    field = next(f for f in schema["train"] if f["name"] == "quantize")
    assert field["choices"] == ["none", "4", "8", "nf4"] and field["default"] == "none" and field["group"] == "model"


@pytest.mark.parametrize("args, needle", [
    (["--backend", "mlx", "--quantize", "nf4"], "--quantize nf4 is not available on the mlx backend"),
    (["--backend", "torch", "--quantize", "4"], "--quantize 4 is MLX's quantization (--backend mlx)"),
    (["--backend", "torch", "--quantize", "nf4"], NF4_NEEDS),  # no CUDA on the test machines
    (["--backend", "torch", "--quantize", "nf4", "--device", "cpu"], NF4_NEEDS),
])
def test_a_quantization_the_backend_cannot_do_exits_2_with_one_line(capsys, dataset, tiny_model, tmp_path, args, needle):
    out = tmp_path / "run"
    code = main(["train", "--data", str(dataset), "--model", str(tiny_model), "--out", str(out), *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and needle in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()


def test_nf4_is_the_qlora_recipe_and_needs_cuda_and_bitsandbytes(monkeypatch, tiny_model):
    import sys
    import types

    import torch

    from wonderland.backends.torch_peft import quantized

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(UserError, match="needs a CUDA GPU and bitsandbytes .pip install bitsandbytes."):
        quantized.nf4_config()
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    config = quantized.nf4_config()
    assert config.load_in_4bit and not config.load_in_8bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant and config.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        quantized.load_nf4(tiny_model, torch.device("cpu"))
    # an nf4 run served where there is no CUDA: its adapter on the float base
    assert quantized.serving_quantize("nf4", torch.device("cpu")) == "none"
    assert quantized.serving_quantize("nf4", torch.device("cuda")) == "nf4"
    from wonderland.backends import get_backend

    chat = get_backend("torch").load(tiny_model, device="cpu", quantize="nf4")
    assert not chat.has_adapter
