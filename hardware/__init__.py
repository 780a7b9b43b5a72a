"""The machine: RAM, CPU cores and flags, GPUs, VRAM, compute capability (`profile`)."""
