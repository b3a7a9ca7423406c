"""SFLAM: quantized split federated fine-tuning of large transformer models on edge devices."""

import logging

# bitsandbytes logs a harmless notice on CPU at import (an optional "kernels" package); peft imports
# bitsandbytes early, so the level is set before any of them loads.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.1.0"
