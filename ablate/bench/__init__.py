"""``ablate bench``: the speed of attention backends and models on this machine, and ``--gpu``."""
