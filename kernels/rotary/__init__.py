"""Rotary position embedding kernels: Triton (triton.py) and C++ CPU (rotary.cc, the module cpu). See README.md."""
