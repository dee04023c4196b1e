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
        ({"bits": 4.0}, r"bits must be one of \[2, 3, 4\], got 4.0"),
        ({"group_size": 0}, r"group_size must be an integer >= 1"),
        ({"group_size": -64}, r"group_size must be an integer >= 1"),
        ({"group_size": 12.5}, r"group_size must be an integer >= 1"),
        ({"backend": "cuda"}, r"backend must be one of \['auto', 'reference', 'cpu', 'cpu_int8', 'triton'\]"),
        ({"levels": "nf4"}, r"levels must be one of \['int', 'pot', 'sp2'\]"),
        ({"levels": "sp2", "zero_level": False}, r"no variant without a zero level"),
        ({"zero_level": "yes"}, r"zero_level must be True, False or None"),
        ({"offset": 1}, r"offset must be True, False or None"),
        ({"module_bits": {"fc": 8}}, r"module_bits\['fc'\] must be one of"),
        ({"module_bits": [4]}, r"module_bits must be a dict"),
        ({"module_bits": {"": 4}}, r"module_bits must be a list of module names"),
        ({"modules_to_not_convert": "lm_head"}, r"modules_to_not_convert must be a list"),
        ({"modules_to_not_convert": [1, 2]}, r"modules_to_not_convert must be a list of module names"),
        ({"format_version": 3}, r"format version 3.*versions \[1, 2\].*Upgrade"),
        ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
        ({"refine_steps": -1}, r"refine_steps must be an integer >= 0"),
        ({"learning_rate": 0}, r"learning_rate must be a finite number > 0"),
        ({"learning_rate": "1e-3"}, r"learning_rate must be a finite number > 0"),
        ({"learning_rate": float("inf")}, r"learning_rate must be a finite number > 0"),
        ({"reg_lambda": float("nan")}, r"reg_lambda must be a finite number >= 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_invalid_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PoTConfig(**kwargs)


def test_round_trip_through_dict():
    cfg = PoTConfig(bits=3, group_size=64, modules_to_not_convert=["lm_head"], module_bits={"a.b": 2}, backend="cpu")
    d = cfg.to_dict()
    assert d["quant_method"] == "pot" and "tokenizer" not in d and d["format_version"] == 2 and d["levels"] == "sp2"
    again = PoTConfig.from_dict(d)
    assert again.to_dict() == d and again.level_set == cfg.level_set


def test_version_1_configs_mean_the_pot_level_set():
    v1 = {"quant_method": "pot", "bits": 3, "group_size": 64, "zero_level": False, "format_version": 1}
    cfg = PoTConfig.from_dict(v1)
    assert cfg.levels == "pot" and cfg.level_set.id == "pot:3:nozero"
    assert cfg.to_dict()["format_version"] == 2 and cfg.to_dict()["levels"] == "pot"  # saved as version 2


def test_a_config_without_format_version_is_refused():
    with pytest.raises(ValueError, match="no format_version"):
        PoTConfig.from_dict({"quant_method": "pot", "bits": 4, "group_size": 64})


def test_level_set_per_module():
    cfg = PoTConfig(bits=4, levels="int", module_bits={"m.down": 2})
    assert cfg.level_set.id == "int:4:offset" and cfg.level_set_for("m.down").id == "int:2:offset"
    assert cfg.unknown_module_bits(["m.up", "m.down"]) == [] and cfg.unknown_module_bits(["m.up"]) == ["m.down"]


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
