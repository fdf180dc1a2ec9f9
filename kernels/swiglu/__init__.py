"""SwiGLU kernels: Triton (triton.py) and C++ CPU (swiglu.cc, the module cpu). See README.md."""
