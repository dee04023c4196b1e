"""transformers integration: the ``"pot"`` quantizer and its weight-conversion ops."""
