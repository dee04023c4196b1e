"""``"pot"`` checkpoints load in processes that never ``import optimum_pot`` (optimum_pot_autoload + its .pth).

Every check runs in a fresh interpreter of this environment, which must have the package installed
(``pip install -e .`` or ``pip install .``): that install is what ships the ``.pth`` file under test.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch

from .conftest import REPO, WIKITEXT_VALID, byte_tokenizer, make_tiny_llama

PTH = "optimum_pot_autoload.pth"
IDS = [[5, 17, 99, 200, 3, 64, 128, 255, 1, 42]]


def run_python(code: str, *flags: str, env: dict | None = None, cwd: str | None = None, timeout: int = 300):
    """``python [flags] -c code`` in a fresh interpreter; returns the completed process (text output)."""
    full_env = {k: v for k, v in os.environ.items() if k != "OPTIMUM_POT_AUTOLOAD"}  # on unless a test says
    full_env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    return subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd
    )


@pytest.fixture(scope="module")
def pot_dir(tmp_path_factory):
    """A tiny PoT checkpoint (with a tokenizer) and the logits it must give, saved next to it."""
    from transformers import AutoModelForCausalLM

    from optimum_pot import PoTConfig

    root = tmp_path_factory.mktemp("autoload")
    make_tiny_llama().save_pretrained(root / "float")
    model = AutoModelForCausalLM.from_pretrained(root / "float", quantization_config=PoTConfig(bits=4, group_size=32))
    model.save_pretrained(root / "pot")
    byte_tokenizer().save_pretrained(root / "pot")
    with torch.no_grad():
        torch.save(model(torch.tensor(IDS)).logits, root / "logits.pt")
    return str(root / "pot")


# Loads DIR with transformers alone and checks the logits; fails if optimum_pot was imported before the load.
LOAD_WITHOUT_IMPORT = """
import sys, torch
import transformers.modeling_utils  # imports transformers.quantizers.auto: the placeholders go in, nothing more
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING
assert "optimum_pot" not in sys.modules, "optimum_pot was imported before any PoT checkpoint was read"
print("registered before load:", getattr(AUTO_QUANTIZATION_CONFIG_MAPPING.get("pot"), "__name__", None))
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(DIR)
with torch.no_grad():
    logits = model(torch.tensor(IDS)).logits
print("layer:", type(model.model.layers[0].mlp.down_proj).__name__)
print("same logits:", torch.equal(logits, torch.load(LOGITS)))
print("optimum_pot from:", sys.modules["optimum_pot"].__file__)
"""


def _load_code(pot_dir: str) -> str:
    logits = os.path.join(os.path.dirname(pot_dir), "logits.pt")
    return f"DIR, LOGITS, IDS = {pot_dir!r}, {logits!r}, {IDS!r}\n" + LOAD_WITHOUT_IMPORT


def test_installed_distribution_ships_the_pth():
    """The install of this environment (editable or not) put the .pth file into site-packages."""
    files = importlib.metadata.distribution("optimum-pot").files or []
    assert any(str(f) == PTH for f in files), (
        f"{PTH} is not installed in this environment; reinstall the package: pip install -e . (or pip install .)"
    )


def test_startup_imports_only_the_tiny_hook():
    """``python -X importtime``: the hook is imported at start-up, imports nothing itself, and no torch or
    transformers module is loaded by an interpreter that does not ask for them."""
    proc = run_python("import sys; print(sorted(sys.modules))", "-X", "importtime")
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    names = [line.rsplit("|", 1)[1] for line in lines]
    hook = [i for i, name in enumerate(names) if name.strip() == "optimum_pot_autoload"]
    assert hook, f"optimum_pot_autoload was not imported at start-up (is {PTH} installed?)"
    depth = len(names[hook[0]]) - len(names[hook[0]].lstrip())
    previous = names[hook[0] - 1]
    assert len(previous) - len(previous.lstrip()) <= depth, f"the hook imported {previous.strip()}"
    loaded = {name.strip().split(".")[0] for name in names}
    assert not loaded & {"torch", "transformers", "optimum_pot", "numpy"}, sorted(loaded)


def test_transformers_loads_pot_checkpoint_without_import(pot_dir):
    proc = run_python(_load_code(pot_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered before load: LazyPoTConfig" in proc.stdout
    assert "layer: PoTLinear" in proc.stdout and "same logits: True" in proc.stdout, proc.stdout


def test_disabled_autoload_names_the_fix(pot_dir):
    """OPTIMUM_POT_AUTOLOAD=0: loading fails with a message naming ``import optimum_pot`` (not transformers'
    "Unknown quantization type"), and works after ``import optimum_pot``."""
    code = (
        f"from transformers import AutoModelForCausalLM\n"
        f"try:\n    AutoModelForCausalLM.from_pretrained({pot_dir!r})\n"
        f"except ImportError as e:\n    print('error:', e)\n"
        f"import optimum_pot\nmodel = AutoModelForCausalLM.from_pretrained({pot_dir!r})\n"
        f"print('after import:', type(model.model.layers[0].mlp.down_proj).__name__)\n"
    )
    proc = run_python(code, env={"OPTIMUM_POT_AUTOLOAD": "0"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        "error: " in proc.stdout and "`import optimum_pot`" in proc.stdout and "OPTIMUM_POT_AUTOLOAD=0" in proc.stdout
    )
    assert "pip install optimum-pot" in proc.stdout
    assert "after import: PoTLinear" in proc.stdout


SOURCE_FILES = ["setup.py", "setup.cfg", "pyproject.toml", "MANIFEST.in", "README.md", PTH, "optimum_pot_autoload.py"]


def _build_wheel(tmp_path, editable: bool) -> str:
    """Builds a copy of this checkout's (editable) wheel with the installed setuptools (no network, no isolation)."""
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(
        os.path.join(REPO, "optimum_pot"), src / "optimum_pot", ignore=shutil.ignore_patterns("__pycache__")
    )
    for name in SOURCE_FILES:
        shutil.copy(os.path.join(REPO, name), src / name)
    hook = "build_editable" if editable else "build_wheel"
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(dist)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return str(dist / proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable-wheel"])
def test_wheels_ship_the_pth_at_the_root(editable, tmp_path):
    """``pip install .`` and ``pip install -e .`` both get the .pth into site-packages (the wheel's root)."""
    with zipfile.ZipFile(_build_wheel(tmp_path, editable)) as whl:
        names = whl.namelist()
        assert PTH in names, names
        assert whl.read(PTH).decode().strip() == "import optimum_pot_autoload"
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        assert PTH in whl.read(record).decode()  # pip uninstall removes it again
    if not editable:
        assert "optimum_pot_autoload.py" in names and "optimum_pot/__init__.py" in names


def test_regular_wheel_install_loads_without_import(pot_dir, tmp_path):
    """The built wheel unpacked as a site directory (what ``pip install .`` does): a fresh interpreter that sees only
    it (``-S``: no other .pth file runs, so the editable install of this checkout is out of the way) loads the
    checkpoint through transformers alone, with optimum_pot imported from the wheel."""
    site_dir = tmp_path / "site"
    with zipfile.ZipFile(_build_wheel(tmp_path, editable=False)) as whl:
        whl.extractall(site_dir)
    deps = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    prelude = f"import site, sys\nsys.path.extend({deps!r})\nsite.addsitedir({str(site_dir)!r})\n"
    proc = run_python(prelude + _load_code(pot_dir), "-S", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "same logits: True" in proc.stdout, proc.stdout
    assert f"optimum_pot from: {site_dir}" in proc.stdout, proc.stdout


LM_EVAL_TASK = """task: pot_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
"""


def test_lm_eval_cli_evaluates_pot_checkpoint(pot_dir, tmp_path):
    """lm-evaluation-harness's own CLI (``lm_eval --model hf``) on the PoT checkpoint, with no wrapper."""
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'optimum-pot[lmeval]')")
    exe = shutil.which("lm_eval") or os.path.join(os.path.dirname(sys.executable), "lm_eval")
    if not os.path.exists(exe):
        pytest.skip("the lm_eval console script is not installed")
    with open(WIKITEXT_VALID, encoding="utf-8") as f:
        paragraphs = [p.strip() for p in f.read().split("\n\n") if len(p.strip()) > 200][:2]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": p[:300]}) + "\n" for p in paragraphs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "pot_tiny.yaml").write_text(LM_EVAL_TASK.format(data=data))
    argv = [exe, "--model", "hf", "--model_args", f"pretrained={pot_dir},dtype=float32", "--tasks", "pot_tiny_ppl",
            "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "1"]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OPTIMUM_POT_AUTOLOAD", None)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "pot_tiny_ppl" in proc.stdout and "word_perplexity" in proc.stdout, proc.stdout[-3000:]
