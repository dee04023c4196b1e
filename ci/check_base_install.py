"""CI step 1: after a bare ``pip install -e .`` (install_requires only, no extras) in a fresh virtual environment,
the package imports silently, quantises, saves, works through optimum's interface and its console script, and a
process that never imports optimum_pot loads the saved checkpoint. Exits non-zero on the first failure."""

import importlib.util
import os
import subprocess
import sys
import tempfile

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("OPTIMUM_POT_AUTOLOAD", None)


def python(code: str, *flags: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *flags, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    if proc.returncode != 0:
        sys.exit(f"FAILED: python {' '.join(flags)} -c ...:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc


def check(ok: bool, what: str, detail: str = "") -> None:
    print(f"{'ok' if ok else 'FAILED'}: {what}", flush=True)
    if not ok:
        sys.exit(detail or what)


def main() -> None:
    peers = [m for m in ("torchao", "hqq", "termcolor", "pytest", "peft", "datasets") if importlib.util.find_spec(m)]
    check(not peers, "the bare install has no extras (a clean environment)", f"found {peers}")
    startup = python("import sys; print(sorted(sys.modules))")
    check("'optimum_pot_autoload'" in startup.stdout, "the .pth hook runs at start-up", startup.stdout)
    check("'torch'" not in startup.stdout and "'transformers'" not in startup.stdout, "start-up imports no torch")
    proc = python("import optimum_pot")
    check(proc.stderr == "", "import optimum_pot prints nothing on stderr", proc.stderr)

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    import optimum_pot

    tmp = tempfile.mkdtemp(prefix="optimum-pot-base-")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(os.path.join(tmp, "float"))
    model = AutoModelForCausalLM.from_pretrained(
        os.path.join(tmp, "float"), quantization_config=optimum_pot.PoTConfig(bits=4, group_size=32)
    )
    model.save_pretrained(os.path.join(tmp, "pot"))
    ids = torch.arange(1, 17).reshape(1, -1)
    with torch.no_grad():
        torch.save(model(ids).logits, os.path.join(tmp, "logits.pt"))
    check(optimum_pot.PoTQuantizer.__name__ == "PoTQuantizer", "optimum_pot.PoTQuantizer (optimum) imports")
    script = os.path.join(os.path.dirname(sys.executable), "optimum-pot")
    info = subprocess.run([script, "info", os.path.join(tmp, "pot")], capture_output=True, text=True, env=ENV)
    check(info.returncode == 0 and "quantization: pot" in info.stdout, "optimum-pot info", info.stderr)
    load = python(
        "import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({os.path.join(tmp, 'pot')!r})\n"
        f"with torch.no_grad():\n    same = torch.equal(m(torch.arange(1, 17).reshape(1, -1)).logits, "
        f"torch.load({os.path.join(tmp, 'logits.pt')!r}))\n"
        "print(type(m.model.layers[0].mlp.down_proj).__name__, same)\n"
    )
    check(load.stdout.split()[-2:] == ["PoTLinear", "True"], "a process without `import optimum_pot` loads it",
          load.stdout + load.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
