"""The MoE-MLA-RoPE decoder family (PyTorch). `config` is torch-free; `transformer` needs torch."""
