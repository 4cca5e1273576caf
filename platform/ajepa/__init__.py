"""ajepa: A-JEPA self-supervised audio pretraining on Ray."""

__version__ = "0.1.0"
