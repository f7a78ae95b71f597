"""ablate: how should I choose my self-attention parameters?"""

__version__ = "0.1.0"
