"""adapterhub: train, share and serve PEFT adapters of every family from one base model."""

__version__ = "0.1.0"
