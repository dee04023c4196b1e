"""The model card (README.md) of PoT checkpoints, written by ``save_pretrained`` and sent by ``push_to_hub``.

transformers builds its own card inside ``push_to_hub`` (``create_and_tag_model_card``) and writes it over whatever
``save_pretrained`` wrote, just before uploading the folder with ``_upload_modified_files``. PoT models therefore get
two per-instance hooks (see :func:`attach_card_hooks`): ``save_pretrained`` writes the card after saving, and
``_upload_modified_files`` merges the PoT section into transformers' card right before the commit is built. Both
look the configuration up at call time, so a dequantised model writes no PoT card.

The PoT section sits between two HTML comments, so re-pushing replaces it instead of appending a second copy, and
a hand-written card on the Hub keeps its text.
"""

import os
import re
import types

from huggingface_hub import ModelCard, ModelCardData

SECTION_START = "<!-- optimum-pot card: start -->"
SECTION_END = "<!-- optimum-pot card: end -->"
# transformers' auto-generated card body: replaced by ours rather than kept alongside it.
_TEMPLATE_MARKER = "This model card has been automatically generated"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def pot_config_of(model):
    """The `PoTConfig` of ``model``, or `None` when it is not (or no longer) PoT-quantised."""
    from ..config import PoTConfig

    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict) and config.get("quant_method") == "pot":
        return PoTConfig.from_dict(config)
    return config if isinstance(config, PoTConfig) else None


def record_eval(model, perplexity: float, text_name: str, seq_len: int | None = None, windows: int | None = None):
    """Records an evaluated perplexity in the model's PoT config, so config.json and the model card report it.

    Args:
        model (`PreTrainedModel`): a PoT-quantised model.
        perplexity (`float`): the measured perplexity.
        text_name (`str`): what it was measured on (e.g. ``"wikitext-2 test"``).
        seq_len (`int`, *optional*): tokens per window.
        windows (`int`, *optional*): number of windows evaluated.
    """
    config = pot_config_of(model)
    if config is None:
        raise ValueError("record_eval needs a PoT-quantised model (from_pretrained with PoTConfig, or quantize()).")
    config.eval_perplexity = float(perplexity)
    config.eval_text = str(text_name)
    config.eval_seq_len = seq_len
    config.eval_windows = windows
    model.config.quantization_config = config


def card_tags(config) -> list[str]:
    """Hub tags of a PoT checkpoint."""
    return ["pot", "quantized", f"{config.bits}-bit", f"pot-{config.levels}", "optimum-pot"]


def _eval_line(config) -> str:
    ppl = getattr(config, "eval_perplexity", None)
    if ppl is None:
        return "not evaluated"
    parts = [f"{ppl:.2f} on {getattr(config, 'eval_text', None) or 'unnamed text'}"]
    seq_len, windows = getattr(config, "eval_seq_len", None), getattr(config, "eval_windows", None)
    if seq_len and windows:
        parts.append(f"({windows} windows × {seq_len} tokens)")
    elif seq_len:
        parts.append(f"(windows of {seq_len} tokens)")
    return " ".join(parts)


def card_section(config, model_ref: str) -> str:
    """The PoT part of the card: method, level set, bits, group size, format version, perplexity, usage."""
    skipped = ", ".join(f"`{m}`" for m in config.modules_to_not_convert or []) or "none"
    module_bits = config.module_bits or {}
    ls = config.level_set
    calibrated = getattr(config, "dataset", None)
    rows = [
        ("method", 'PoT (signed power-of-two weights), `quant_method: "pot"`'),
        ("level set", f"`{ls.id}`: {ls.description}"),
        ("levels (× scale)", ", ".join(f"{v:g}" for v in ls.levels) + (" + a group offset" if ls.offset else "")),
        ("bits", f"{config.bits} per weight"),
        ("group size", f"{config.group_size} input columns per float16 scale"),
        ("format version", str(_written_version())),
        ("modules kept in float", skipped),
        ("per-module bits", f"{len(module_bits)} overrides" if module_bits else "none"),
        ("calibration", f"calibrated on `{calibrated}`" if isinstance(calibrated, str) else "calibration-free"),
        ("perplexity", _eval_line(config)),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"""{SECTION_START}
## PoT quantisation

The linear layers of this model are stored as `w = s · L[code]{" + z" if ls.offset else ""}`, where every level of `L`
is a signed power of two or a sum of two (no multiplier needed), packed {config.bits} bits per weight with one float16
scale{" and offset" if ls.offset else ""} per group, by the `optimum-pot` package (its `docs/format.md` specifies the
on-disk format).

| | |
|---|---|
{table}

```python
import optimum_pot  # registers quant_method "pot" with transformers
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{model_ref}")  # loads straight into packed PoTLinear modules
float_model = model.dequantize()  # back to nn.Linear, if needed
```
{SECTION_END}"""


def render_card(config, existing: str | None = None, model_ref: str = "PATH_OR_REPO_ID", base_model=None) -> str:
    """The full README.md: ``existing`` (transformers' card, or one already on the Hub) with the PoT section.

    Args:
        config (`PoTConfig`): the model's configuration.
        existing (`str`, *optional*): a card to merge into; its metadata and hand-written text are kept, an old PoT
            section is replaced and transformers' auto-generated body is dropped.
        model_ref (`str`): the repo id or path shown in the usage snippet.
        base_model (`str`, *optional*): Hub id of the float model, for the card metadata.
    """
    data, body = {}, existing or ""
    if body.lstrip().startswith("---"):  # YAML metadata block (ModelCard warns when parsing a card without one)
        card = ModelCard(body)
        data, body = card.data.to_dict(), card.text or ""
    tags = list(data.get("tags") or [])
    data["tags"] = tags + [t for t in card_tags(config) if t not in tags]
    data.setdefault("library_name", "transformers")
    if base_model and base_model != model_ref and _HUB_ID.match(base_model) and not os.path.exists(base_model):
        data.setdefault("base_model", base_model)
    section = card_section(config, model_ref)
    if SECTION_START in body and SECTION_END in body:
        head, _, rest = body.partition(SECTION_START)
        body = head + section + rest.partition(SECTION_END)[2]
    elif _TEMPLATE_MARKER in body or not body.strip():
        body = f"\n# {_title(model_ref, config)}\n\n{section}\n"
    else:
        body = f"\n{section}\n{body}"
    return f"---\n{ModelCardData(**data).to_yaml()}\n---\n{body}"


def _written_version() -> int:
    from ..config import FORMAT_VERSION

    return FORMAT_VERSION


def _title(model_ref: str, config) -> str:
    name = os.path.basename(os.path.normpath(model_ref)) or "model"
    return f"{name} (PoT {config.levels} {config.bits}-bit, group size {config.group_size})"


def write_card(directory: str, config, model_ref: str | None = None, base_model=None) -> str:
    """Writes (or merges into) ``directory/README.md``; returns its path."""
    path = os.path.join(directory, "README.md")
    existing = None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            existing = f.read()
    text = render_card(config, existing, model_ref or directory, base_model)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _base_model(model) -> str | None:
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def _save_pretrained(self, save_directory, *args, **kwargs):
    # Looked up on the class, so a deep copy of the model (which rebinds these methods) saves itself.
    out = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    config = pot_config_of(self)
    if config is not None and kwargs.get("is_main_process", True) and os.path.isdir(save_directory):
        write_card(os.fspath(save_directory), config, base_model=_base_model(self))
    return out


def _upload_modified_files(self, working_dir, repo_id, *args, **kwargs):
    config = pot_config_of(self)
    if config is not None:
        write_card(os.fspath(working_dir), config, model_ref=repo_id, base_model=_base_model(self))
    return type(self)._upload_modified_files(self, working_dir, repo_id, *args, **kwargs)


def attach_card_hooks(model) -> None:
    """Makes ``model.save_pretrained`` and ``model.push_to_hub`` write the PoT model card (idempotent).

    Only transformers models are hooked; a plain torch model has neither method.
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel) or "_upload_modified_files" in model.__dict__:
        return
    # Bound methods in the instance dict: deepcopy/pickle rebind them to the copy instead of sharing closures.
    model.__dict__["save_pretrained"] = types.MethodType(_save_pretrained, model)
    model.__dict__["_upload_modified_files"] = types.MethodType(_upload_modified_files, model)
