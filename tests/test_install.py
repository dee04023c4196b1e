"""Packaging: what the install declares, what it pulls in, and what CI proves on a fresh virtual environment."""

import ast
import configparser
import importlib.metadata
import os
import re
import subprocess
import sys

from .conftest import REPO

# Benchmark peers (setup.cfg's `bench` extra): importing them prints noise (torchao's "Failed to load ..."), so no
# install command of the README may bring them in. Their import names, hidden in the subprocess below.
BENCH_MODULES = ["torchao", "hqq", "optimum.quanto", "termcolor"]
# Third-party modules optimum_pot imports only inside the feature that needs them: module -> extra declaring it.
OPTIONAL_IMPORTS = {"datasets": "calib", "peft": "peft", "triton": "triton"}


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    return cfg


def requirement_names(text: str) -> set[str]:
    """Normalised distribution names of a setup.cfg requirement list."""
    names = set()
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.add(normalise(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0]))
    return names


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extras() -> dict[str, set[str]]:
    cfg = setup_cfg()
    return {name: requirement_names(value) for name, value in cfg.items("options.extras_require")}


def third_party_imports() -> dict[str, list[str]]:
    """Top-level third-party modules imported anywhere in the package (any depth, lazy imports too) -> files."""
    found: dict[str, list[str]] = {}
    files = [os.path.join(root, f) for root, _, fs in os.walk(os.path.join(REPO, "optimum_pot")) for f in fs]
    for path in [f for f in files if f.endswith(".py")] + [os.path.join(REPO, "optimum_pot_autoload.py")]:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names}:
                if top not in sys.stdlib_module_names and not top.startswith("optimum_pot"):
                    found.setdefault(top, []).append(os.path.relpath(path, REPO))
    return found


def test_every_third_party_import_is_declared():
    """Each third-party module the package imports comes from install_requires, or (imported lazily by one
    feature) from that feature's extra. `optimum` (for optimum_pot.PoTQuantizer) was once only in the dev extra."""
    required = requirement_names(setup_cfg().get("options", "install_requires"))
    assert {"torch", "transformers", "accelerate", "optimum", "safetensors", "huggingface-hub"} <= required
    declared_extras = extras()
    dists = importlib.metadata.packages_distributions()
    for module, files in third_party_imports().items():
        candidates = {normalise(d) for d in dists.get(module, [module])}
        if module in OPTIONAL_IMPORTS:
            extra = OPTIONAL_IMPORTS[module]
            assert candidates & declared_extras[extra], f"{module} ({files[0]}) is missing from extra [{extra}]"
        else:
            assert candidates & required, f"{module} (imported by {files[0]}) is not in install_requires"


def test_readme_install_command_leaves_benchmark_peers_out():
    """``make install`` (the README's set-up) installs the extras it names; none of them is a benchmark peer."""
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    recipe = makefile.split("\ninstall:", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r'-e "\.\[([\w,]+)\]"', recipe)[0].split(","))
    declared = extras()
    peers = declared["bench"] - {"gguf", "psutil"}  # gguf also reads SmolLM2's GGUF; psutil comes with accelerate
    assert peers and "bench" not in named
    installed = set().union(*(declared[e] for e in named)) | requirement_names(
        setup_cfg().get("options", "install_requires")
    )
    assert not installed & peers, f"make install would install benchmark peers {sorted(installed & peers)}"


def test_import_prints_nothing():
    """``import optimum_pot`` in a fresh interpreter writes nothing to stderr (benchmark peers hidden, as in an
    install without the bench extra; CI's fresh environment does not have them at all)."""
    hide = "".join(f"sys.modules[{m!r}] = None\n" for m in BENCH_MODULES)
    code = f"import sys\n{hide}import optimum_pot\nprint(optimum_pot.__version__)\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert proc.stderr == "", f"import optimum_pot wrote to stderr:\n{proc.stderr}"


def test_ci_runs_the_readme_on_a_fresh_environment():
    """.ci/run builds its own virtual environment (no system site-packages), installs with the README's command,
    runs the main job in smoke mode, then the README's test command; the example accepts that smoke mode."""
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        script = "\n".join(line for line in f.read().splitlines() if not line.lstrip().startswith("#"))
    assert "-m venv" in script and "--system-site-packages" not in script
    steps = [script.index(s) for s in ("make install", "make demo", "make test")]
    assert steps == sorted(steps) and "--smoke" in script
    sys.path.insert(0, os.path.join(REPO, "examples"))
    try:
        from quantize_smollm2 import parse_args
    finally:
        sys.path.pop(0)
    args = parse_args(["--smoke"])
    assert args.smoke and args.max_windows <= 2 and args.model == "smollm2"
    assert args.dataset and os.path.isfile(args.dataset) and args.num_samples <= 2  # calibrates, on a small set
    assert parse_args(["--smoke", "--no-calibration"]).dataset is None
