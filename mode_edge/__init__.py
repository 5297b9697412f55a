"""mode-edge: Modular Domain Experts for on-device language models."""

__version__ = "0.1.0"
