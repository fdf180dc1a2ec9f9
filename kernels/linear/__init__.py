"""The fp32 linear layer's C++ CPU kernel (linear.cc, the module cpu). See README.md."""
