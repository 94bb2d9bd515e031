"""perseus-edge: train, export, quantize and run small MoE-MLA-RoPE language models."""
__version__ = "0.1.0"
