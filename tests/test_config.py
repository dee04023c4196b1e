"""PoTConfig validation and its config.json round trip."""

import pytest
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

import optimum_pot
from optimum_pot import PoTConfig
from optimum_pot.hf.quantizer import PoTHfQuantizer


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 5}, r"bits must be one of \[2, 3, 4\]"),
        ({"bits": 1}, r"bits must be one of \[2, 3, 4\]"),
        ({"bits": True}, r"bits must be one of"),
        ({"group_size": 0}, r"group_size must be a positive integer"),
        ({"group_size": -64}, r"group_size must be a positive integer"),
        ({"group_size": 12.5}, r"group_size must be a positive integer"),
        ({"backend": "cuda"}, r"backend must be one of \['auto', 'reference', 'cpu', 'cpu_int8', 'triton'\]"),
        ({"zero_level": "yes"}, r"zero_level must be True or False"),
        ({"module_bits": {"fc": 8}}, r"module_bits\['fc'\] must be one of"),
        ({"modules_to_not_convert": "lm_head"}, r"modules_to_not_convert must be a list"),
        ({"format_version": 2}, r"format version 2.*versions \[1\]"),
        ({"num_samples": 0}, r"num_samples must be a positive integer"),
        ({"learning_rate": 0}, r"learning_rate must be > 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoTConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = PoTConfig(bits=3, group_size=64, modules_to_not_convert=["lm_head"], module_bits={"a.b": 2}, backend="cpu")
    d = cfg.to_dict()
    assert d["quant_method"] == "pot" and "tokenizer" not in d
    again = PoTConfig.from_dict(d)
    assert again.to_dict() == d


def test_in_memory_dataset_not_serialised():
    d = PoTConfig(dataset=["some text"] * 3, tokenizer=object()).to_dict()
    assert "dataset" not in d and "tokenizer" not in d
    assert PoTConfig(dataset="wikitext2").to_dict()["dataset"] == "wikitext2"


def test_registered_once():
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["pot"] is PoTConfig
    assert AUTO_QUANTIZER_MAPPING["pot"] is PoTHfQuantizer
    import importlib

    importlib.reload(optimum_pot.hf.registration)
    optimum_pot.hf.registration.register()  # idempotent, no "already registered" error
