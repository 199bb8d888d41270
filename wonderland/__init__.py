"""wonderland: teach a small language model to *be* a character from a book, by LoRA fine-tuning."""

__version__ = "0.1.0"
