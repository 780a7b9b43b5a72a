"""The model's files and shape, without torch: where they live (hub id, HF folder, `.gguf`), the
shape and parameter counts read from config.json or GGUF metadata, and the one-time GGUF ->
safetensors conversion (`model.convert`, run as a child process; the only module here that needs torch)."""
