"""One-time ``torch.compile`` cost of PoT SmolLM2 decode on CPU, by compile scope and options (docs/compile.md).

    python bench/compile_cost.py            # SmolLM2-135M PoT 4-bit g64, every variant (minutes each on 2 cores)
    python bench/compile_cost.py --smoke    # CI: a tiny random Llama, two variants, backend "eager" (plumbing only)

Greedy decode with a static KV cache and a hand-written loop (as bench/cpu_e2e.py). Each variant runs in a fresh
process with its own empty Inductor cache (``TORCHINDUCTOR_CACHE_DIR``), so its first call pays the full compile;
"warm" re-runs a variant in a new process on the cache the cold run filled (a user's second run). Reported: seconds
to the first 3 tokens (prompt step + 2 decode steps, compile included) and decode tokens/s beyond the first token,
with ratios to the whole-forward compile and to eager, all measured in this run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpu_e2e import _rate_beyond_first, static_greedy  # noqa: E402  (bench/cpu_e2e.py's decode loop and rate)

# name -> (what is compiled, dynamic, mode); "eager" compiles nothing.
VARIANTS = {
    "eager": (None, None, None),
    "forward": ("forward", None, None),  # torch.compile(model.forward): what a user writes first
    "forward, dynamic=False": ("forward", False, None),
    "decode step, dynamic=False": ("decode", False, None),
    "decode step, dynamic=False, max-autotune": ("decode", False, "max-autotune-no-cudagraphs"),
}
SMOKE_VARIANTS = ["forward, dynamic=False", "decode step, dynamic=False"]
WARM = "decode step, dynamic=False"  # re-run on its filled cache


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, two variants, backend eager (CI)")
    p.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; eager with --smoke)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions of the decode rate (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded for the rate")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per variant")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="run only these variants (default: all)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child process: run one variant, print JSON
    p.add_argument("--model-dir", help=argparse.SUPPRESS)  # the child's model, saved by the parent
    return p.parse_args(argv)


def quantise_once(smoke: bool, folder: str) -> str:
    """Saves the PoT model every variant loads: SmolLM2 pot:4 g64 with closed-form scales (compile cost does not
    depend on scale values, and the op is one opaque call per layer whatever its level set; the scale search would
    take minutes), or a tiny random Llama."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from optimum_pot import PoTConfig, quantize

    config = PoTConfig(bits=4, group_size=64, levels="pot", grid_points=1)
    if smoke:
        torch.manual_seed(0)
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)  # fmt: skip
        model = quantize(LlamaForCausalLM(cfg).eval(), config)
    else:
        from optimum_pot.utils.models import smollm2_checkpoint

        model = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), quantization_config=config)
    model.save_pretrained(folder)
    return folder


def run_variant(name: str, args) -> dict:
    """Child process: the cold first-3-token time and the steady decode rate of one variant."""
    from transformers import AutoModelForCausalLM, StaticCache

    import optimum_pot  # noqa: F401  (registers "pot" even where the autoload hook is off)

    torch.set_num_threads(args.threads)
    scope, dynamic, mode = VARIANTS[name]
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    n0, new = args.prompt, args.new_tokens
    prompt = torch.randint(0, model.config.vocab_size, (1, n0), generator=torch.Generator().manual_seed(0))
    cache = StaticCache(config=model.config, max_cache_len=n0 + new)
    options = {"dynamic": dynamic, "mode": mode, "backend": args.backend}
    compiled = torch.compile(model.forward, **options) if scope else model.forward
    prefill = compiled if scope == "forward" else model.forward

    run = static_greedy(prefill, compiled, prompt, cache)
    with torch.no_grad():
        t0 = time.perf_counter()
        run(3)
        first = time.perf_counter() - t0
        run(3)  # any recompilation left (e.g. dynamic shapes after a second call) happens here, not in the rate
    return {"variant": name, "first_3_tokens_s": first, "decode_tok_s": _rate_beyond_first(run, new, args.reps)}


def spawn(name: str, cache_dir: str, args) -> dict:
    """Runs one variant in a fresh process with ``cache_dir`` as its Inductor cache."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, os.path.abspath(__file__), "--variant", name, "--threads", str(args.threads),
            "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--backend", args.backend,
            "--reps", str(args.reps), "--model-dir", args.model_dir]  # fmt: skip
    argv += ["--smoke"] if args.smoke else []
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        return {"variant": name, "error": (proc.stderr.strip().splitlines() or ["?"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.smoke:
        args.prompt, args.new_tokens, args.reps = min(args.prompt, 8), min(args.new_tokens, 6), 1
    args.backend = args.backend or ("eager" if args.smoke else "inductor")
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return
    names = args.variants or (SMOKE_VARIANTS if args.smoke else list(VARIANTS))
    model = "tiny random Llama (smoke)" if args.smoke else "SmolLM2-135M PoT pot:4 g64"
    print(f"## torch.compile cost: {model}, prompt {args.prompt}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, backend {args.backend}, torch {torch.__version__}", flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="pot-compile-cost-") as root:
        args.model_dir = quantise_once(args.smoke, os.path.join(root, "model"))
        for name in names:
            rows.append(spawn(name, os.path.join(root, name.replace(" ", "_")), args))
            print(f"  {name}: {rows[-1]}", flush=True)
        if WARM in names and args.backend == "inductor":
            warm = spawn(WARM, os.path.join(root, WARM.replace(" ", "_")), args)
            warm["variant"] = f"{WARM} (warm cache)"
            rows.append(warm)
    report(rows)
    if any("error" in r for r in rows):
        sys.exit("a variant failed (see the table)")


def report(rows: list[dict]) -> None:
    """The table, with ratios to the whole-forward compile (first tokens) and to eager (decode rate)."""
    ok = {r["variant"]: r for r in rows if "error" not in r}
    base = ok.get("forward") or ok.get("forward, dynamic=False")
    eager = ok.get("eager")
    print("\n| variant | first 3 tokens (s) | vs forward | decode tok/s | vs eager |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        vs_base = f"{r['first_3_tokens_s'] / base['first_3_tokens_s']:.2f}x" if base else ""
        vs_eager = f"{r['decode_tok_s'] / eager['decode_tok_s']:.2f}x" if eager else ""
        print(f"| {r['variant']} | {r['first_3_tokens_s']:.1f} | {vs_base} | {r['decode_tok_s']:.1f} | {vs_eager} |")


if __name__ == "__main__":
    main()
