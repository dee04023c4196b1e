"""Text sources: a file path, a list of strings, or a ``datasets`` dataset (or its name)."""

import os
from typing import Any

KNOWN_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1")}


def load_texts(source: Any, split: str = "train", text_column: str = "text") -> list[str]:
    """Returns the list of strings behind ``source``.

    Args:
        source: a path to a text file (read whole, as one string), a list of strings, a ``datasets.Dataset``
            with a ``text_column``, or a dataset name for ``datasets.load_dataset`` ("wikitext2" is a shortcut).
        split (`str`): split of a named dataset.
        text_column (`str`): column holding the text.
    """
    if isinstance(source, str | os.PathLike) and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return [f.read()]
    if isinstance(source, list | tuple):
        if not all(isinstance(s, str) for s in source):
            raise ValueError("A dataset given as a list must hold strings (raw text samples).")
        return list(source)
    if isinstance(source, str):
        import datasets

        name, config = KNOWN_DATASETS.get(source, (source, None))
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # offline, or an unknown name
            raise ValueError(
                f"Could not load dataset {source!r} ({e.__class__.__name__}: {e}). Pass a local text file path, a "
                "list of strings or a datasets.Dataset instead."
            ) from e
        source = ds
    if hasattr(source, "column_names"):
        if text_column not in source.column_names:
            raise ValueError(f"Dataset has no {text_column!r} column; its columns are {source.column_names}.")
        return [t for t in source[text_column] if t]
    raise ValueError(f"Unsupported text source of type {type(source).__name__}: use a file path, list[str] or Dataset.")
