"""The core, no Ray inside: config, models and splitting, quantization, codec, data, round semantics."""
