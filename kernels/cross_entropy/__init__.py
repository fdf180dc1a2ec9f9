"""Loss kernels: the Triton row kernel (triton.py), the CUDA row kernel (cross_entropy.cu, libcodex_cross_entropy.so)
and the fused C++ CPU linear cross-entropy (linear_cross_entropy.cc, the module cpu). See README.md."""
