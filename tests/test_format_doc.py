"""The numpy reader printed in docs/format.md decodes saved checkpoints exactly like ``PoTLinear``."""

import os
import re

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_pot import PoTConfig, PoTLinear

from .conftest import REPO, make_tiny_gpt2, make_tiny_llama

FORMAT_DOC = os.path.join(REPO, "docs", "format.md")


def doc_reader():
    """``read_pot_layer`` from the ```python block between the reader markers of docs/format.md."""
    with open(FORMAT_DOC, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"<!-- reader:start -->\s*```python\n(.*?)```\s*<!-- reader:end -->", text, re.S)
    assert match, "docs/format.md lost its reader code block (<!-- reader:start --> ... <!-- reader:end -->)"
    namespace = {}
    exec(compile(match.group(1), FORMAT_DOC, "exec"), namespace)
    return namespace["read_pot_layer"]


@pytest.mark.parametrize(
    "kind, bits, group_size, levels",
    [("llama", 4, 32, {}), ("llama", 3, 64, {"levels": "pot"}),
     ("llama", 2, 16, {"levels": "pot", "zero_level": False}), ("gpt2", 3, 48, {"levels": "int"}),
     ("llama", 4, 128, {"levels": "sp2", "offset": False})],
    ids=["llama-sp2-4bit-g32", "llama-pot-3bit-g64", "llama-pot-2bit-g16-nozero", "gpt2-int-3bit-g48",
         "llama-sp2-nooffset-g128"],
)  # fmt: skip
def test_doc_reader_matches_pot_linear(kind, bits, group_size, levels, tmp_path):
    make = make_tiny_llama if kind == "llama" else make_tiny_gpt2
    make().save_pretrained(tmp_path / "float")
    config = PoTConfig(bits=bits, group_size=group_size, **levels)
    AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config).save_pretrained(tmp_path / "q")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    read_pot_layer = doc_reader()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PoTLinear)]
    assert layers
    for name, module in layers:
        expected = module.dequantize_weight(torch.float32).detach().numpy()
        np.testing.assert_array_equal(read_pot_layer(str(tmp_path / "q"), name), expected)


def test_doc_reader_reads_version_1():
    path = os.path.join(REPO, "tests", "fixtures", "pot_v1_tiny_llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    read_pot_layer = doc_reader()
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, PoTLinear)]:
        expected = module.dequantize_weight(torch.float32).detach().numpy()
        np.testing.assert_array_equal(read_pot_layer(path, name, module.in_features), expected)


def test_doc_reader_reads_sharded_checkpoints_and_module_bits(tmp_path):
    """Shards (model.safetensors.index.json) and per-module bit widths are part of the documented format."""
    make_tiny_llama().save_pretrained(tmp_path / "float")
    config = PoTConfig(bits=4, group_size=32, module_bits={"model.layers.0.mlp.down_proj": 2})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=config)
    model.save_pretrained(tmp_path / "q", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "q" / "model.safetensors.index.json")
    read_pot_layer = doc_reader()
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        module = model.get_submodule(name)
        expected = module.dequantize_weight(torch.float32).detach().numpy()
        np.testing.assert_array_equal(read_pot_layer(str(tmp_path / "q"), name), expected)
