"""Shared fixtures: tiny random Llama and GPT-2 models built from configs (no downloads)."""

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny tensors: a second thread only adds synchronisation (and stalls badly on a loaded machine).
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(REPO), "shared", "data")
WIKITEXT_VALID = os.path.join(SHARED_DATA, "wikitext-2", "valid.txt")
WIKITEXT_TEST = os.path.join(SHARED_DATA, "wikitext-2", "test.txt")


def make_tiny_llama(seed: int = 0):
    """A 2-layer Llama whose hidden size (72) is no multiple of common group sizes, like SmolLM2's 576."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=72,
        intermediate_size=200,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg).eval()


def make_tiny_gpt2(seed: int = 0):
    """A 2-layer GPT-2 (transformers ``Conv1D`` layers, transposed weights)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_gpt2")
    make_tiny_gpt2().save_pretrained(path)
    return str(path)


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model_path(request, tiny_llama_path, tiny_gpt2_path):
    return tiny_llama_path if request.param == "llama" else tiny_gpt2_path


def byte_tokenizer():
    """An offline byte-level tokenizer with 256 ids, matching the tiny models' vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0])


@pytest.fixture(scope="session")
def lib():
    """The CPU operator library, built (or loaded from the cache) once; skips where this machine cannot build it."""
    from optimum_pot.kernels.cpu import build
    from optimum_pot.kernels.cpu.build import KernelBuildError

    try:
        return build.load_op()
    except KernelBuildError as err:
        pytest.skip(f"CPU kernel unavailable: {err}")


@pytest.fixture(autouse=True, scope="session")
def fp32_prefill():
    """Off in tests (session-wide, so module fixtures see it too): the bfloat16 prefill GEMM that ``cpu_int8``/``auto``
    take on AMX CPUs, so that tests asserting fp32 identities (a packed model equals its dequantized or fake-quantised
    float model; a recorded perplexity is reproduced) mean the same on every machine. test_cpu_kernel.py turns it on
    (``monkeypatch.setitem``) where it tests that path."""
    from optimum_pot.kernels.cpu import linear

    linear._STATE["bf16"] = False
    yield
    linear._STATE.pop("bf16", None)
