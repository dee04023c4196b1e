"""An exported PoT SmolLM2 decode step: ``torch.export`` + AOTInductor, run without Python model code.

The one-token decode step of SmolLM2-135M with a static KV cache (transformers'
``TorchExportableModuleWithStaticCache``, the ExecuTorch recipe) is exported with ``torch.export`` and compiled
ahead of time into an AOTInductor package (``.pt2``). A fresh process that imports only ``torch`` (no
transformers, no optimum_pot) loads the PoT operator library (``torch.ops.load_library``) and the package, feeds
the prompt one token at a time, then decodes greedily and reports tokens/s; its tokens are checked against the eager
model fed the same way. Rows: float32, the default 4-bit PoT model with the int8 ``lm_head`` copy
(``PoTConfig(lm_head="int8")``), the same with ``fuse_projections`` (q/k/v and gate/up one matmul each), then
llama.cpp on the same GGUF in the same run (when llama-cpp-python runs here). Export and compile times are printed.

    python bench/export_decode.py              # 32-token prompt, 64 new tokens, 2 threads (~8 min on 2 cores)
    python bench/export_decode.py --smoke      # CI: the fused PoT row only, 4-token prompt, 4 new tokens
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "test.txt")

# Runs in a fresh interpreter: torch only (asserted), the operator library, the package.
RUNNER = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
if sys.argv[1]:
    torch.ops.load_library(sys.argv[1])
step = torch._inductor.aoti_load_package(sys.argv[2])
io = json.loads(sys.argv[3])
prompt, new = io["prompt"], io["new"]

def run():
    with torch.no_grad():
        for i, t in enumerate(prompt):  # the static cache is overwritten from position 0 on every run
            logits = step(input_ids=torch.tensor([[t]]), cache_position=torch.tensor([i]))
        out = [int(logits[0, -1].argmax())]
        t0 = time.perf_counter()
        for j in range(new - 1):
            logits = step(input_ids=torch.tensor([[out[-1]]]), cache_position=torch.tensor([len(prompt) + j]))
            out.append(int(logits[0, -1].argmax()))
        return out, (new - 1) / (time.perf_counter() - t0)

run()  # warm-up
tokens, rate = max((run() for _ in range(2)), key=lambda r: r[1])
# (optimum_pot_autoload, the stdlib-only .pth hook of an installed optimum_pot, is not model code)
assert not any(m.split(".")[0] in ("transformers", "optimum_pot") for m in sys.modules), "model code was imported"
print(json.dumps({"tokens": tokens, "rate": rate}))
"""


def export_package(model, max_len: int, path: str) -> tuple[str, float, float, torch.nn.Module]:
    """``(package path, export s, AOTInductor compile s, the exported module)`` of ``model``'s one-token
    static-cache decode step."""
    from transformers.integrations.executorch import TorchExportableModuleWithStaticCache

    model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    wrapper = TorchExportableModuleWithStaticCache(model, batch_size=1, max_cache_len=max_len).eval()
    kwargs = {"input_ids": torch.tensor([[1]]), "cache_position": torch.tensor([0])}
    t0 = time.perf_counter()
    with torch.no_grad():
        ep = torch.export.export(wrapper, (), kwargs, strict=True)  # non-strict: AOTI hits a functionalization assert
    t1 = time.perf_counter()
    with torch.no_grad():
        pkg = torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return pkg, t1 - t0, time.perf_counter() - t1, wrapper


def eager_tokens(wrapper, prompt: list[int], new: int) -> list[int]:
    """Greedy tokens of the exported module run eagerly, fed exactly like the package (one token per call, so every
    matmul takes the same decode path): the reference the package's tokens are compared with."""
    step = lambda t, i: int(wrapper(input_ids=torch.tensor([[t]]), cache_position=torch.tensor([i]))[0, -1].argmax())  # noqa: E731
    with torch.no_grad():
        for i, t in enumerate(prompt):
            nxt = step(t, i)
        out = [nxt]
        for j in range(new - 1):
            out.append(step(out[-1], len(prompt) + j))
    return out


def package_rate(model, library: str, prompt: list[int], new: int, threads: int, path: str) -> dict:
    """Exports and compiles ``model``'s decode step to ``path``, runs it in a torch-only process (``library``: the
    PoT operator library, or "" for none) and compares its tokens with the eager module's. Returns ``export_s``,
    ``compile_s`` and either ``rate``/``tokens``/``same`` or ``error`` (the runner's last stderr line)."""
    pkg, t_export, t_compile, wrapper = export_package(model, len(prompt) + new, path)
    out = {"export_s": t_export, "compile_s": t_compile}
    io = json.dumps({"prompt": prompt, "new": new})
    proc = subprocess.run([sys.executable, "-c", RUNNER, library, pkg, io, str(threads)], capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        return {**out, "error": (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1][:200]}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    eager = eager_tokens(wrapper, prompt, new)
    if res["tokens"] != eager:  # reported, not fatal: inductor reorders float sums, a near-tied argmax can flip
        print(f"  package tokens {res['tokens'][:16]}, eager {eager[:16]}")
    return {**out, **res, "same": res["tokens"] == eager}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt_tokens, args.new_tokens = 4, 4
    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from cpu_e2e import pot_smollm2
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import fuse_projections, int8_lm_head
    from optimum_pot.kernels.cpu import build
    from optimum_pot.utils.models import smollm2_checkpoint

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok(open(WIKITEXT, encoding="utf-8").read()[:4000]).input_ids[: args.prompt_tokens]
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pot = int8_lm_head(pot_smollm2(float_model, path))
    fused = int8_lm_head(pot_smollm2(float_model, path))
    fuse_projections(fused)  # q/k/v and gate/up: one packed matmul each in the graph
    library = str(build.load_op()._name)
    print(f"## Exported decode step (torch.export + AOTInductor), SmolLM2-135M, prompt {args.prompt_tokens} tokens "
          f"fed one at a time, {args.new_tokens} new tokens greedy, {args.threads} threads, torch only in the "
          "runner process\n")  # fmt: skip
    print("| model | export s | AOTI compile s | decode tok/s | tokens = eager |\n|---|---|---|---|---|")
    failed = []  # rows whose package did not run
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            ("float32", float_model, ""),
            ("PoT 4-bit default + int8 lm_head", pot, library),
            ("PoT 4-bit default + int8 lm_head + fused projections", fused, library),
        ]
        for name, model, lib in rows[2:] if args.smoke else rows:
            res = package_rate(model, lib, prompt, args.new_tokens, args.threads, os.path.join(tmp, "step.pt2"))
            if "error" in res:
                failed.append(name)
                print(f"| {name} | {res['export_s']:.0f} | {res['compile_s']:.0f} | runner failed: {res['error']} | |")
                continue
            print(f"| {name} | {res['export_s']:.0f} | {res['compile_s']:.0f} | {res['rate']:.1f} | {res['same']} |",
                  flush=True)  # fmt: skip
    if not args.smoke:  # the yardstick, same run: llama.cpp on the GGUF the float checkpoint came from
        from cpu_e2e import llama_cpp_numbers

        text = open(WIKITEXT, encoding="utf-8").read()[:4000]
        cpp = llama_cpp_numbers(text, args.prompt_tokens, 512, args.new_tokens, args.threads, 2)
        if cpp is not None:
            print(f"| llama.cpp Q4_1 (llama-cpp-python, same GGUF) | – | – | {cpp[0]:.1f} | – |", flush=True)
    if failed:
        raise SystemExit(f"the exported package did not run for: {failed}")


if __name__ == "__main__":
    main()
