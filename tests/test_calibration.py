"""Calibrated PTQ (``optimum_pot.calibration``) on the tiny Llama and GPT-2: error reduction, routes, errors."""

import os

import pytest
import torch

from optimum_pot import PoTConfig, PoTLinear, PoTQuantizer, quantize
from optimum_pot.calibration import calibrate, calibration_samples, find_blocks

from .conftest import WIKITEXT_VALID, byte_tokenizer, make_tiny_gpt2, make_tiny_llama

MAKERS = {"llama": make_tiny_llama, "gpt2": make_tiny_gpt2}
SEQ = 64


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def texts():
    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        text = f.read(60_000)
    return [p for p in text.split("\n\n") if p.strip()]


def cal_config(tok, bits=3, **kw):
    base = dict(bits=bits, group_size=32, tokenizer=tok, num_samples=8, seq_len=SEQ, epochs=2, learning_rate=5e-3)
    return PoTConfig(**{**base, **kw})


def last_hidden_error(model, ref, ids) -> float:
    """Mean squared error of the final hidden states against the float model's."""
    with torch.no_grad():
        out = model(ids, output_hidden_states=True).hidden_states[-1]
        want = ref(ids, output_hidden_states=True).hidden_states[-1]
    return (out - want).pow(2).mean().item()


def held_out_ids(tok):
    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        f.seek(200_000)
        text = f.read(4000)
    return tok(text, return_tensors="pt").input_ids[:, : 2 * SEQ].reshape(2, SEQ)


@pytest.mark.parametrize("bits", [2, 3, 4], ids=lambda b: f"{b}bit")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibration_reduces_block_output_error(arch, bits, tok, texts):
    make = MAKERS[arch]
    ref, ids = make(), held_out_ids(tok)
    rtn = quantize(make(), PoTConfig(bits=bits, group_size=32))
    cal = quantize(make(), cal_config(tok, bits), texts)
    assert last_hidden_error(cal, ref, ids) < last_hidden_error(rtn, ref, ids)


@pytest.mark.parametrize("levels", ["pot", "int", "sp2"])
def test_error_feedback_beats_step2_alone(levels, tok, texts):
    """Error-feedback rounding (the default) ends closer to the float model than nearest rounding + step 2."""
    ref, ids = make_tiny_llama(), held_out_ids(tok)
    nearest = quantize(make_tiny_llama(), cal_config(tok, levels=levels, rounding="nearest"), texts)
    gptq = quantize(make_tiny_llama(), cal_config(tok, levels=levels), texts)
    assert last_hidden_error(gptq, ref, ids) < last_hidden_error(nearest, ref, ids)


@pytest.mark.parametrize("kw", [dict(act_order=False), dict(group_scales="dynamic"), dict(act_weighted_init=False)],
                         ids=["natural-order", "dynamic-scales", "stored-scales"])  # fmt: skip
def test_gptq_options_reduce_error(kw, tok, texts):
    ref, ids = make_tiny_llama(), held_out_ids(tok)
    rtn = quantize(make_tiny_llama(), PoTConfig(bits=3, group_size=32))
    cal = quantize(make_tiny_llama(), cal_config(tok, **kw), texts)
    assert last_hidden_error(cal, ref, ids) < last_hidden_error(rtn, ref, ids)


def _codes(model):
    from optimum_pot.format.packing import unpack

    return {n: unpack(m.weight, m.bits, m.in_features) for n, m in model.named_modules() if isinstance(m, PoTLinear)}


def test_step2_after_error_feedback_keeps_codes(tok, texts):
    """PoTPTQ step 2 after error feedback learns scales with GPTQ's codes fixed, and lowers each block's error."""
    plain, model = make_tiny_llama(), make_tiny_llama()
    quantize(plain, cal_config(tok, refine_scales=False), texts)
    cfg = cal_config(tok)  # step 2 after GPTQ is the default
    quantize(model, cfg)  # calibration-free first, then calibrate() with the float targets kept below
    for name, m in make_tiny_llama().named_modules():
        if name.startswith("model.layers") and isinstance(m, torch.nn.Linear):
            model.get_submodule(name)._float_weight = m.weight.detach()
    report = calibrate(model, cfg, texts, progress=False)
    assert all(r["after"] < r["before"] and len(r["loss_per_epoch"]) == 2 for r in report)
    first = [n for n in _codes(model) if n.startswith("model.layers.0.")]
    a, b = _codes(plain), _codes(model)
    assert all(torch.equal(a[n], b[n]) for n in first)  # block 0: same inputs, same codes
    assert not all(torch.equal(plain.get_submodule(n).weight_scale, model.get_submodule(n).weight_scale)
                   for n in first)  # fmt: skip


def test_report_per_block_error_falls(tok, texts):
    model = make_tiny_llama()
    cfg = cal_config(tok)
    quantize(model, cfg)  # calibration-free first: calibrate() then reads the float targets kept below
    for name, m in make_tiny_llama().named_modules():
        if name.startswith("model.layers") and isinstance(m, torch.nn.Linear):
            model.get_submodule(name)._float_weight = m.weight.detach()
    report = calibrate(model, cfg, texts, progress=False)
    assert len(report) == 2 and all(r["after"] < r["before"] for r in report)
    assert all(r["float_block_mb"] > 0 and r["activations_mb"] > 0 and r["cpu_seconds"] > 0 for r in report)
    assert all(0 <= e < 1 for r in report for e in r["layer_error"].values())
    assert model.pot_calibration_report is report
    assert not any(hasattr(m, "_float_weight") for m in model.modules())  # float targets are dropped


def test_find_blocks(tok):
    assert find_blocks(quantize(make_tiny_llama(), PoTConfig(group_size=32)))[0] == "model.layers"
    assert find_blocks(quantize(make_tiny_gpt2(), PoTConfig(group_size=32)))[0] == "transformer.h"
    with pytest.raises(ValueError, match="quantise the model first"):
        find_blocks(make_tiny_llama())


def test_samples_from_file_list_and_dataset(tok, texts, tmp_path):
    import datasets

    from_list = calibration_samples(texts, tok, 4, SEQ)
    from_ds = calibration_samples(datasets.Dataset.from_dict({"text": texts}), tok, 4, SEQ)
    assert from_list.shape == (4, SEQ) and torch.equal(from_list, from_ds)
    file = tmp_path / "calibration.txt"
    file.write_text("\n\n".join(texts[:40]), encoding="utf-8")
    assert calibration_samples(str(file), tok, 3, SEQ).shape == (3, SEQ)


def test_missing_tokenizer_raises(texts):
    with pytest.raises(ValueError, match="needs a tokenizer"):
        quantize(make_tiny_llama(), PoTConfig(group_size=32, seq_len=SEQ), texts)


@pytest.mark.parametrize("data", [[], ["", "  \n"]], ids=["empty-list", "blank-strings"])
def test_empty_dataset_raises(tok, data):
    with pytest.raises(ValueError, match="dataset is empty"):
        quantize(make_tiny_llama(), cal_config(tok), data)


def test_too_short_samples_raise(tok, texts):
    with pytest.raises(ValueError, match="lower PoTConfig\\(seq_len"):
        quantize(make_tiny_llama(), cal_config(tok, seq_len=512), ["a short sentence."])
    with pytest.raises(ValueError, match="fewer than num_samples=8.*lower PoTConfig\\(num_samples=3\\)"):
        quantize(make_tiny_llama(), cal_config(tok), ["x" * (3 * SEQ + 10)])  # one token per byte: 3 samples


def test_amp_step2_matches_float32(tok, texts):
    """Step 2 in bfloat16 autocast lands on the same quality as in float32 (both beat error feedback alone), and the
    block's learned scales differ (it really ran in bfloat16)."""
    ref, ids = make_tiny_llama(), held_out_ids(tok)
    gptq = quantize(make_tiny_llama(), cal_config(tok, refine_scales=False), texts)
    fp32 = quantize(make_tiny_llama(), cal_config(tok, amp=False), texts)
    bf16 = quantize(make_tiny_llama(), cal_config(tok, amp=True), texts)
    e_gptq, e32, e16 = (last_hidden_error(m, ref, ids) for m in (gptq, fp32, bf16))
    assert e32 < e_gptq and e16 < e_gptq
    assert e16 < 1.25 * e32
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(fp32.get_submodule(name).weight_scale, bf16.get_submodule(name).weight_scale)


def test_uses_amp_follows_the_config_then_the_device_and_bits():
    from optimum_pot.calibration.options import AMP_MIN_BITS, fast_bfloat16, uses_amp

    cpu = torch.device("cpu")
    for bits in (2, 3, 4):
        assert uses_amp(PoTConfig(amp=True), cpu, bits) and not uses_amp(PoTConfig(amp=False), cpu, bits)
    assert not uses_amp(PoTConfig(), torch.device("meta"), 4)  # unknown device: float32
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    fast = any(bool(getattr(torch.cpu, p, lambda: False)()) for p in probes)
    assert fast_bfloat16(cpu) == fast
    assert uses_amp(PoTConfig(), cpu, AMP_MIN_BITS) == fast
    assert not uses_amp(PoTConfig(), cpu, AMP_MIN_BITS - 1)  # narrower blocks keep float32 (measured better)


@pytest.mark.parametrize(
    "field,value",
    [("calibration_batch_size", 0), ("act_weighted_init", "yes"), ("rounding", "gptq2"), ("group_scales", "x"),
     ("gptq_block_size", 0), ("act_order", 1), ("refine_scales", "no"), ("amp", "yes")],
    ids=["batch0", "awi-str", "rounding", "group-scales", "block0", "act-order-int", "refine-str", "amp-str"],
)  # fmt: skip
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        PoTConfig(**{field: value})


def test_float_weights_missing_raises(tok, texts):
    model = quantize(make_tiny_llama(), PoTConfig(bits=3, group_size=32))  # in memory: no checkpoint to re-read
    with pytest.raises(ValueError, match="needs the float weight"):
        calibrate(model, cal_config(tok), texts, progress=False)


def _assert_same_packed(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_quantize_saves_and_reloads_bit_exact(tok, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantize(make_tiny_llama(), cal_config(tok), texts)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    _assert_same_packed(model, again)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_from_pretrained_calibrates(arch, tok, texts, tmp_path, tiny_llama_path, tiny_gpt2_path):
    from transformers import AutoModelForCausalLM

    path = tiny_llama_path if arch == "llama" else tiny_gpt2_path
    ref, ids = AutoModelForCausalLM.from_pretrained(path), held_out_ids(tok)
    rtn = AutoModelForCausalLM.from_pretrained(path, quantization_config=PoTConfig(bits=3, group_size=32))
    cal = AutoModelForCausalLM.from_pretrained(path, quantization_config=cal_config(tok, dataset=texts))
    assert any(isinstance(m, PoTLinear) for m in cal.modules())
    assert last_hidden_error(cal, ref, ids) < last_hidden_error(rtn, ref, ids)
    cal.save_pretrained(tmp_path)
    _assert_same_packed(cal, AutoModelForCausalLM.from_pretrained(tmp_path))


def test_optimum_quantizer_interface(tok, texts, tmp_path, tiny_llama_path):
    from optimum.quantization_base import OptimumQuantizer
    from transformers import AutoModelForCausalLM

    quantizer = PoTQuantizer.from_pretrained(tiny_llama_path)
    assert isinstance(quantizer, OptimumQuantizer)
    quantizer.tokenizer = tok
    model = quantizer.quantize(tmp_path, quantization_config=cal_config(tok), dataset=texts)
    assert os.path.isfile(tmp_path / "config.json")
    _assert_same_packed(model, AutoModelForCausalLM.from_pretrained(tmp_path))
    with pytest.raises(ValueError, match="not both"):
        PoTQuantizer(make_tiny_llama()).quantize(tmp_path, quantization_config=PoTConfig(), bits=3)


def test_all_routes_run_the_same_pipeline(tok, texts, tmp_path, tiny_llama_path):
    """quantize(), from_pretrained(dataset=...), PoTQuantizer and the CLI's --dataset give bit-identical checkpoints."""
    import shutil

    from transformers import AutoModelForCausalLM

    from optimum_pot.cli.main import main

    data, src = tmp_path / "calibration.txt", tmp_path / "float"
    data.write_text("\n\n".join(texts[:60]), encoding="utf-8")
    shutil.copytree(tiny_llama_path, src)
    tok.save_pretrained(src)  # the CLI takes the checkpoint's own tokenizer
    fields = dict(bits=3, group_size=32, num_samples=4, seq_len=SEQ)
    routes = {
        "quantize": quantize(AutoModelForCausalLM.from_pretrained(src), PoTConfig(**fields, tokenizer=tok), str(data)),
        "from_pretrained": AutoModelForCausalLM.from_pretrained(
            src, quantization_config=PoTConfig(**fields, tokenizer=tok, dataset=str(data))
        ),
        "optimum": PoTQuantizer.from_pretrained(src).quantize(
            tmp_path / "optimum", quantization_config=PoTConfig(**fields), dataset=str(data)
        ),
    }
    argv = ["quantize", str(src), str(tmp_path / "cli"), "--bits", "3", "--group-size", "32", "--dataset", str(data)]
    assert main(argv + ["--num-samples", "4", "--seq-len", str(SEQ)]) == 0
    routes["cli"] = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    for name, model in routes.items():
        assert model.pot_calibration_report if name != "cli" else True
        _assert_same_packed(routes["quantize"], model)


@pytest.mark.slow
def test_smollm2_calibration_beats_rtn():
    """4-bit sp2 on SmolLM2: calibration lowers perplexity below the calibration-free quantisation's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot.utils.models import smollm2_checkpoint
    from optimum_pot.utils.perplexity import perplexity

    from .conftest import WIKITEXT_TEST

    path = smollm2_checkpoint()
    tk = AutoTokenizer.from_pretrained(path)
    cfg = dict(bits=4, group_size=64)
    rtn = AutoModelForCausalLM.from_pretrained(path, quantization_config=PoTConfig(**cfg))
    cal = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=PoTConfig(**cfg, dataset=WIKITEXT_VALID, tokenizer=tk, num_samples=8),
    )
    ppl = [perplexity(m, tk, WIKITEXT_TEST, 512, max_windows=4, progress=False) for m in (rtn, cal)]
    assert ppl[1] < ppl[0]
