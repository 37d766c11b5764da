"""p2p-local: on-device LLM personalization with Profile-to-PEFT."""

__version__ = "0.1.0"
