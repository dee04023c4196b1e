"""Pure PoT format math: the level set, scale initialisation and bit packing."""
