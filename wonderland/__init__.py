"""wonderland: teach a small language model to *be* a character from a book, by LoRA fine-tuning."""

__version__ = "0.1.0"

import logging as _logging

# PEFT imports bitsandbytes whenever it is installed (the test extra has its CPU build); on CPUs with
# AVX512-BF16 its CPU backend then warns at import that an optional kernel package ("kernels") is
# missing, a line every command would print though nothing here uses that kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
