"""SFLAM: quantized split federated fine-tuning of large transformer models on edge devices."""

from sflam._imports import guard_bitsandbytes

guard_bitsandbytes()  # before peft or anything else imports bitsandbytes (see sflam._imports)

__version__ = "0.1.0"
