"""The ``optimum-pot`` CLI on a tiny Llama with a byte-level tokenizer: quantize, eval, info, errors, scripts."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from optimum_pot import FORMAT_VERSION, PoTConfig
from optimum_pot.cli.main import main

from .conftest import WIKITEXT_VALID, byte_tokenizer


@pytest.fixture(scope="module")
def float_dir(tiny_llama_path, tmp_path_factory):
    """The shared tiny Llama, copied, with a tokenizer saved beside it."""
    path = str(tmp_path_factory.mktemp("cli") / "float")
    shutil.copytree(tiny_llama_path, path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def quantized_dir(float_dir):
    out = os.path.join(os.path.dirname(float_dir), "pot")
    argv = ["quantize", float_dir, out, "--bits", "3", "--group-size", "32", "--eval-text", WIKITEXT_VALID]
    assert main(argv + ["--eval-windows", "2", "--eval-seq-len", "64"]) == 0
    return out


def test_quantize_writes_checkpoint_tokenizer_and_card(quantized_dir, capsys):
    files = set(os.listdir(quantized_dir))
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files
    with open(os.path.join(quantized_dir, "config.json")) as f:
        quant = json.load(f)["quantization_config"]
    assert (quant["quant_method"], quant["bits"], quant["group_size"]) == ("pot", 3, 32)
    assert quant["format_version"] == FORMAT_VERSION
    assert quant["eval_perplexity"] > 1 and quant["eval_text"] == "wikitext-2/valid.txt"
    assert (quant["eval_seq_len"], quant["eval_windows"]) == (64, 2)
    with open(os.path.join(quantized_dir, "README.md")) as f:
        card = f.read()
    assert "| bits | 3" in card and "| group size | 32" in card and f"{quant['eval_perplexity']:.2f}" in card


def test_quantize_prints_the_settings_it_wrote(float_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["quantize", float_dir, out, "--bits", "2", "--group-size", "24", "--grid-points", "1"]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        written = PoTConfig.from_dict(json.load(f)["quantization_config"])
    assert (written.bits, written.group_size) == (2, 24)
    assert f"PoT {written.level_set.id} (2-bit), group size 24" in printed, printed


def test_quantize_refuses_a_pot_checkpoint(quantized_dir, tmp_path, capsys):
    """A PoT MODEL would load with its own saved settings whatever the command line says: refused, naming why."""
    out = tmp_path / "again"
    assert main(["quantize", quantized_dir, str(out), "--bits", "4", "--group-size", "128"]) == 2
    err = capsys.readouterr().err
    assert "already a PoT checkpoint" in err and "group size 32" in err and "float checkpoint" in err
    assert not out.exists()


def test_quantize_needs_overwrite_for_a_non_empty_output(float_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["quantize", float_dir, str(out), "--bits", "4", "--group-size", "32", "--grid-points", "1"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and sorted(os.listdir(out)) == ["notes.txt"]
    assert main(argv + ["--overwrite"]) == 0
    assert {"config.json", "model.safetensors", "notes.txt"} <= set(os.listdir(out))
    (tmp_path / "empty").mkdir()  # an existing empty folder needs no --overwrite
    assert main(argv[:2] + [str(tmp_path / "empty")] + argv[3:]) == 0


def test_eval_matches_recorded_perplexity(quantized_dir, capsys):
    """``eval`` on the saved checkpoint reproduces the perplexity measured right after quantising."""
    argv = ["eval", quantized_dir, "--text-file", WIKITEXT_VALID, "--seq-len", "64", "--max-windows", "2"]
    assert main(argv) == 0
    with open(os.path.join(quantized_dir, "config.json")) as f:
        recorded = json.load(f)["quantization_config"]["eval_perplexity"]
    assert f"{recorded:.3f}" in capsys.readouterr().out


def test_eval_record_updates_config_and_card(quantized_dir, tmp_path):
    path = str(tmp_path / "pot")
    shutil.copytree(quantized_dir, path)
    argv = ["eval", path, "--text-file", WIKITEXT_VALID, "--seq-len", "32", "--max-windows", "1", "--record"]
    assert main(argv) == 0
    with open(os.path.join(path, "config.json")) as f:
        quant = json.load(f)["quantization_config"]
    assert (quant["eval_seq_len"], quant["eval_windows"]) == (32, 1)
    with open(os.path.join(path, "README.md")) as f:
        card = f.read()
    assert card.count("## PoT quantisation") == 1 and "(1 windows × 32 tokens)" in card


def test_info(quantized_dir, capsys):
    assert main(["info", quantized_dir]) == 0
    out = capsys.readouterr().out
    assert "quantization: pot" in out and "bits: 3" in out and "PoT layers: 14" in out


def test_quantize_with_dataset(float_dir, tmp_path, capsys):
    argv = ["quantize", float_dir, str(tmp_path / "out"), "--bits", "4", "--group-size", "32"]
    argv += ["--dataset", WIKITEXT_VALID, "--num-samples", "2", "--seq-len", "32", "--epochs", "1"]
    rc = main(argv)
    err = capsys.readouterr().err
    if rc == 2 and "NotImplementedError" in err:
        pytest.skip(f"calibration is not implemented yet: {err.strip()}")
    assert rc == 0, err
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["quantization_config"]["dataset"] == WIKITEXT_VALID


@pytest.mark.parametrize(
    "argv_tail, message",
    [
        (["quantize", "{missing}", "{out}"], "neither a checkpoint folder nor a Hub id"),
        (["quantize", "{empty}", "{out}"], "has no config.json"),
        (["quantize", "{float}", "{file}"], "is a file"),
        (["quantize", "{float}", "{out}", "--group-size", "0"], "group_size must be"),
        (["quantize", "{float}", "{out}", "--eval-text", "{missing}"], "no such file"),
        (["eval", "{float}", "--text-file", "{missing}"], "no such file"),
        (["eval", "{float}", "--text-file", WIKITEXT_VALID, "--seq-len", "1"], "--seq-len must be >= 2"),
        (["info", "{missing}"], "neither a checkpoint folder nor a Hub id"),
    ],
    ids=[
        "missing-model",
        "folder-without-config",
        "output-is-file",
        "group-size-0",
        "missing-eval-text",
        "eval-missing-text",
        "eval-seq-len-1",
        "info-missing-model",
    ],
)
def test_user_errors_exit_2_with_message(argv_tail, message, float_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    paths = {
        "missing": str(tmp_path / "nope" / "x.y"),
        "empty": str(tmp_path / "empty"),
        "float": float_dir,
        "out": str(tmp_path / "out"),
        "file": str(tmp_path / "file"),
    }
    argv = [a.format(**paths) for a in argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("bits", ["5", "four"], ids=["bits-5", "bits-not-int"])
def test_bad_bits_is_an_argparse_error(bits, float_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", float_dir, str(tmp_path / "out"), "--bits", bits])
    assert exc.value.code == 2 and "--bits" in capsys.readouterr().err


def _console_script(name: str) -> list[str]:
    path = shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        pytest.skip(f"console script {name} is not installed (pip install -e .[dev])")
    return [path]


@pytest.mark.parametrize("script, expected", [("optimum-pot", "quantize"), ("optimum-cli", "export")])
def test_console_scripts_help(script, expected):
    """``optimum-pot --help`` works, and installing the package leaves ``optimum-cli`` working."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(_console_script(script) + ["--help"], capture_output=True, text=True, timeout=180, env=env)
    assert out.returncode == 0, out.stderr
    assert expected in out.stdout


def test_cli_defaults_follow_potconfig():
    """Options left unset quantise as ``PoTConfig()`` does (the CLI once defaulted to group 128 against 64)."""
    from optimum_pot.cli.main import build_parser
    from optimum_pot.cli.quantize import build_config

    args = build_parser().parse_args(["quantize", "in", "out"])
    built, default = build_config(args, None).to_dict(), PoTConfig().to_dict()
    for key in (
        "bits",
        "group_size",
        "levels",
        "offset",
        "zero_level",
        "backend",
        "num_samples",
        "refine_scales",
        "seq_len",
        "epochs",
        "rounding",
        "damp_percent",
        "act_order",
        "group_scales",
    ):
        assert built[key] == default[key], key
