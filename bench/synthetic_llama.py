"""A 1B-class synthetic Llama: PoT 4-bit decode vs float vs llama.cpp Q4_0 on the same weights, one run.

A Llama with random weights (seeded, std 0.02; hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads, tied
embeddings, SmolLM2's tokenizer and vocabulary of 49,152) is saved as a float16 transformers checkpoint. llama.cpp
gets the same weights through its own converter (``convert_hf_to_gguf.py`` from the llama.cpp source tree that
llama-cpp-python's sdist vendors; ``--llama-cpp-src``) to an F16 GGUF, then ``llama_model_quantize`` to Q4_0. PoT
quantises the same checkpoint at load (``PoTConfig(bits=4)``, calibration-free). Decode speed does not depend on
the weights' values, so random weights measure what a real 1B model would.

    python bench/synthetic_llama.py --llama-cpp-src /path/to/llama.cpp    # ~15 min on 2 cores, ~12 GB RAM
    python bench/synthetic_llama.py --smoke                                 # CI: a 2-layer, 256-wide model

Rows: float32 ``generate``; PoT defaults (``generate``, float head); PoT with the int8 head (``lm_head="int8"``), on
torch's threads and with split threads; the documented fast settings (int8 head + ``fuse_projections``, the decode
step exported and compiled by AOTInductor, run by a torch-only process: ``bench/export_decode.py``; ``--no-export``
skips it); llama.cpp Q4_0 (skipped, with the reason, when llama-cpp-python or the converter is missing or cannot
run here).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_e2e import WIKITEXT, decode_rate, llama_cpp_numbers  # noqa: E402
from export_decode import package_rate  # noqa: E402

SHAPES = {"1b": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                     num_key_value_heads=8),
          "smoke": dict(hidden_size=256, num_hidden_layers=2, intermediate_size=512, num_attention_heads=4,
                        num_key_value_heads=2)}  # fmt: skip
QUANT_Q4_0 = 2  # llama_ftype LLAMA_FTYPE_MOSTLY_Q4_0


def build_checkpoint(out: str, shape: dict) -> str:
    """Saves the seeded random Llama (float16) with SmolLM2's tokenizer into ``out`` once; returns ``out``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from optimum_pot.utils.models import smollm2_checkpoint

    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(out + ".tmp")
    tok.save_pretrained(out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def to_gguf_q4_0(path: str, src: str | None, workdir: str) -> tuple[str | None, str]:
    """(Q4_0 GGUF path or None, note): llama.cpp's converter to F16, then its quantiser, each in a child process."""
    script = None if src is None else os.path.join(src, "convert_hf_to_gguf.py")
    if script is None or not os.path.isfile(script):
        return None, f"llama.cpp skipped: no convert_hf_to_gguf.py under --llama-cpp-src ({src})"
    f16, q4 = os.path.join(workdir, "model-f16.gguf"), os.path.join(workdir, "model-q4_0.gguf")
    env = {**os.environ, "PYTHONPATH": os.path.join(src, "gguf-py")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, path, "--outtype", "f16", "--outfile", f16], env=env,
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        return None, f"llama.cpp converter failed: {proc.stderr.strip().splitlines()[-1:]}"
    code = ("import sys, llama_cpp; p = llama_cpp.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); "
            "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, f16, q4, str(QUANT_Q4_0)], capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"llama.cpp quantize failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    os.remove(f16)
    return q4, f"converted to F16 and quantised to Q4_0 by llama.cpp in {time.perf_counter() - t0:.0f} s"


def exported_row(pot, prompt: list[int], new: int, threads: int, tmp: str) -> tuple[str, float]:
    """The fast settings' row: ``pot`` (int8 head, fused) exported + AOTInductor, run by a torch-only process."""
    from optimum_pot.kernels.cpu import build

    res = package_rate(pot, str(build.load_op()._name), prompt, new, threads, os.path.join(tmp, "step.pt2"))
    if "error" in res:
        raise SystemExit(f"the exported decode step did not run: {res['error']}")
    print(f"exported in {res['export_s']:.0f} s, AOTInductor compile {res['compile_s']:.0f} s, "
          f"tokens = eager: {res['same']}")  # fmt: skip
    return "PoT 4-bit + int8 lm_head + fused projections (exported step, AOTInductor)", res["rate"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--llama-cpp-src", default=os.environ.get("LLAMA_CPP_SRC"), help="llama.cpp source tree")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--no-export", action="store_true", help="skip the exported decode-step row")
    p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "optimum_pot"))
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import PoTConfig, fuse_projections, int8_lm_head
    from optimum_pot.kernels.cpu import set_num_threads

    shape = SHAPES["smoke" if args.smoke else "1b"]
    new, reps, n_prompt = (4, 1, 8) if args.smoke else (args.new_tokens, 2, 32)
    path = build_checkpoint(os.path.join(args.cache, f"synthetic-llama-{'smoke' if args.smoke else '1b'}"), shape)
    tok = AutoTokenizer.from_pretrained(path)
    text = open(WIKITEXT, encoding="utf-8").read()[:4000]
    prompt = tok(text, return_tensors="pt").input_ids[:, :n_prompt]
    print(f"## Synthetic Llama {shape} (random weights, vocab {len(tok)}), prompt {n_prompt} tokens, {new} new "
          f"tokens greedy, {args.threads} threads\n")  # fmt: skip
    rows = []
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows.append(("float32 (HF generate)", decode_rate(model, prompt, new, reps, tok.eos_token_id)))
    del model
    t0 = time.perf_counter()
    pot = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=PoTConfig(bits=4)).eval()
    print(f"PoT 4-bit quantised at load in {time.perf_counter() - t0:.0f} s")
    rows.append(("PoT 4-bit default (HF generate)", decode_rate(pot, prompt, new, reps, tok.eos_token_id)))
    pot = int8_lm_head(pot)
    rows.append(("PoT 4-bit + int8 lm_head (HF generate)", decode_rate(pot, prompt, new, reps, tok.eos_token_id)))
    torch.set_num_threads(1)  # decode: tiny torch ops on one thread, the PoT kernels on all (docs/cpu_kernel.md)
    set_num_threads(args.threads)
    rows.append(("PoT 4-bit + int8 lm_head (HF generate, split threads)",
                 decode_rate(pot, prompt, new, reps, tok.eos_token_id)))  # fmt: skip
    torch.set_num_threads(args.threads)
    set_num_threads(None)
    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_export:
            fuse_projections(pot)  # q/k/v and gate/up: one packed matmul each
            rows.append(exported_row(pot, prompt[0].tolist(), new, args.threads, tmp))
        del pot
        gguf, note = to_gguf_q4_0(path, args.llama_cpp_src, tmp)
        print(note)
        if gguf is not None:
            cpp = llama_cpp_numbers(text, n_prompt, n_prompt, new, args.threads, reps, gguf=gguf)
            if cpp is not None:
                rows.append(("llama.cpp Q4_0 (llama-cpp-python)", cpp[0]))
    base = rows[0][1]
    print("\n| model | decode tok/s | vs float |\n|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
