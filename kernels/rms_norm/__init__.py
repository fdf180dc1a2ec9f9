"""RMSNorm kernels: Triton (triton.py) and C++ CPU (rms_norm.cc, the module cpu). See README.md."""
