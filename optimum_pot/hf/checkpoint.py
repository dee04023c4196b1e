"""Self-describing, verified checkpoints (format version 2): what each packed layer is, stored beside its tensors.

Every safetensors file written by ``save_pretrained`` carries, in its header metadata:

* ``optimum_pot.format_version``: ``"2"``;
* ``optimum_pot.level_sets``: JSON ``{level-set id: [value of each code]}`` of the level sets used;
* ``optimum_pot.layers``: JSON ``{module: {levels, group_size, in_features, out_features, sha256}}``, where
  ``sha256`` is the digest of the layer's packed codes, scales and offsets (raw little-endian bytes, in that order).

At load, the metadata must agree with ``config.json`` and with this version's level tables, or the load fails
naming the disagreement. Digests are checked by ``optimum-pot info --verify`` and, with
``OPTIMUM_POT_VERIFY=1``, at every load. Version-1 checkpoints have no metadata and are checked against
``config.json`` alone.
"""

import hashlib
import json
import os

import torch

from ..format.registry import from_id
from ..nn.pot_linear import PoTLinear

PREFIX = "optimum_pot."
VERIFY_ENV = "OPTIMUM_POT_VERIFY"


def tensor_digest(*tensors: torch.Tensor | None) -> str:
    """SHA-256 of the raw bytes of ``tensors`` (skipping `None`), in order."""
    h = hashlib.sha256()
    for t in tensors:
        if t is not None:
            h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy())
    return h.hexdigest()


def layer_fields(module: PoTLinear) -> dict:
    """What decides how ``module``'s tensors decode (config.json decides all of it)."""
    return {
        "levels": module.level_set.id,
        "group_size": module.group_size,
        "in_features": module.in_features,
        "out_features": module.out_features,
    }


def layer_record(module: PoTLinear) -> dict:
    """:func:`layer_fields` and the digest of the layer's packed tensors."""
    return {**layer_fields(module), "sha256": tensor_digest(module.weight, module.weight_scale, module.weight_offset)}


def checkpoint_metadata(model: torch.nn.Module, format_version: int) -> dict[str, str]:
    """The safetensors header metadata of ``model``'s PoT layers (see the module docstring)."""
    layers = {name: layer_record(m) for name, m in model.named_modules() if isinstance(m, PoTLinear)}
    level_sets = {r["levels"]: list(from_id(r["levels"]).values) for r in layers.values()}
    return {
        PREFIX + "format_version": str(format_version),
        PREFIX + "level_sets": json.dumps(level_sets, sort_keys=True),
        PREFIX + "layers": json.dumps(layers, sort_keys=True),
    }


def read_metadata(files) -> dict | None:
    """The PoT metadata of a checkpoint's safetensors ``files`` (``None`` for version-1 checkpoints).

    Raises:
        ValueError: unreadable metadata, or shards that disagree.
    """
    from safetensors import safe_open

    found = None
    for file in files or ():
        if not str(file).endswith(".safetensors") or not os.path.isfile(file):
            continue
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        if PREFIX + "layers" not in meta:
            continue
        try:
            parsed = {
                "format_version": int(meta[PREFIX + "format_version"]),
                "level_sets": json.loads(meta[PREFIX + "level_sets"]),
                "layers": json.loads(meta[PREFIX + "layers"]),
            }
        except (KeyError, ValueError) as err:
            raise ValueError(f"The PoT metadata of {file} is corrupted ({err}); re-save or re-download the "
                             "checkpoint.") from err  # fmt: skip
        if found is not None and parsed != found:
            raise ValueError(f"The PoT metadata of {file} disagrees with the checkpoint's other shards; the "
                             "checkpoint mixes files of different saves. Re-save or re-download it.")  # fmt: skip
        found = parsed
    return found


_DTYPES = {"U8": torch.uint8, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def tensor_headers(files) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (safetensors dtype, shape)}`` of a checkpoint, from the file headers only."""
    from safetensors import safe_open

    out = {}
    for file in files or ():
        if str(file).endswith(".safetensors") and os.path.isfile(file):
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def check_tensor_layout(files, modules: dict[str, PoTLinear]) -> None:
    """Raises `ValueError` naming each packed tensor whose stored dtype or shape disagrees with config.json.

    Runs before transformers loads anything, so the message names the PoT setting instead of transformers' generic
    size-mismatch error.
    """
    headers = tensor_headers(files)
    if not headers:
        return
    problems = []
    for name, m in modules.items():
        for tensor, expected in (("weight", m.weight), ("weight_scale", m.weight_scale),
                                 ("weight_offset", m.weight_offset)):  # fmt: skip
            key = f"{name}.{tensor}"
            found = headers.get(key) or next((v for k, v in headers.items() if key.endswith("." + k)), None)
            if expected is None:
                continue
            if found is None:
                problems.append(f"{key} is missing")
            elif _DTYPES.get(found[0]) != expected.dtype or found[1] != tuple(expected.shape):
                problems.append(f"{key} is {found[0]} {list(found[1])}, config.json ({m.level_set.id}, group_size="
                                f"{m.group_size}) needs {expected.dtype} {list(expected.shape)}")  # fmt: skip
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"This PoT checkpoint does not match its config.json: {shown}. The checkpoint is "
                         "incomplete or its config.json was edited; restore it or re-save the model.")  # fmt: skip


def check_agreement(metadata: dict, modules: dict[str, PoTLinear]) -> None:
    """Raises `ValueError` naming each disagreement between the stored metadata and the modules config.json builds."""
    problems = []
    for level_id, values in metadata["level_sets"].items():
        try:
            ours = list(from_id(level_id).values)
        except ValueError as err:
            raise ValueError(str(err)) from None
        if [float(v) for v in values] != ours:
            problems.append(f"level set {level_id} stores the table {values}, this version has {ours} (upgrade "
                            "optimum_pot)")  # fmt: skip
    stored = metadata["layers"]
    for name in sorted(set(stored) - set(modules)):
        problems.append(f"{name} is packed in the checkpoint but config.json keeps it in float")
    for name in sorted(set(modules) - set(stored)):
        problems.append(f"{name} is a PoT layer by config.json but has no packed tensors in the checkpoint")
    for name in sorted(set(stored) & set(modules)):
        for key, value in layer_fields(modules[name]).items():
            if stored[name].get(key) != value:
                problems.append(f"{name}: the checkpoint has {key}={stored[name].get(key)!r}, config.json gives "
                                f"{value!r}")  # fmt: skip
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"This PoT checkpoint does not match its config.json: {shown}. Re-save the model with "
                         "optimum_pot, or restore the config.json it was saved with.")  # fmt: skip


def verify_digests(metadata: dict, modules: dict[str, PoTLinear]) -> None:
    """Raises `ValueError` naming the layers whose loaded tensors do not hash to the stored digests."""
    bad = [
        name for name, m in modules.items()
        if name in metadata["layers"] and metadata["layers"][name].get("sha256") != tensor_digest(
            m.weight, m.weight_scale, m.weight_offset)
    ]  # fmt: skip
    if bad:
        raise ValueError(f"PoT checkpoint integrity check failed for {bad[:5]}{' ...' if len(bad) > 5 else ''}: the "
                         "packed tensors changed since they were saved (corrupted download or disk). Re-download "
                         "the checkpoint.")  # fmt: skip


def verify_files(files) -> tuple[int, list[str]]:
    """Checks the digests of a saved checkpoint's packed tensors without building the model.

    Returns:
        ``(layers checked, names of the layers whose tensors do not match)``.

    Raises:
        ValueError: a version-1 checkpoint (it has no digests) or unreadable metadata.
    """
    from safetensors import safe_open

    meta = read_metadata(files)
    if meta is None:
        raise ValueError("This checkpoint has no PoT digests (format version 1, or not a PoT checkpoint); load and "
                         "re-save it with optimum_pot to add them.")  # fmt: skip
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if key.endswith((".weight", ".weight_scale", ".weight_offset")):
                    tensors[key] = (str(file), key)
    bad = []
    for name, record in meta["layers"].items():
        parts = []
        for suffix in (".weight", ".weight_scale", ".weight_offset"):
            where = tensors.get(name + suffix)
            if where is not None:
                with safe_open(where[0], framework="pt") as f:
                    parts.append(f.get_tensor(where[1]))
        if not parts or tensor_digest(*parts) != record.get("sha256"):
            bad.append(name)
    return len(meta["layers"]), bad


def verify_on_load() -> bool:
    """Whether ``$OPTIMUM_POT_VERIFY`` asks for digest checks at every load."""
    return os.environ.get(VERIFY_ENV, "").lower() in ("1", "true", "yes")
