"""Attention kernels: Triton (triton.py) and tensor-core CUDA (attention.cu, libcodex_attention.so). See README.md."""
