"""Generation: the pure sampler (``sampling``), the coarse -> c2f -> audio pipeline (``pipeline``), ``vamp``."""
