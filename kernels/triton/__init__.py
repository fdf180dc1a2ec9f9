"""Triton kernels. Each module holds its kernels, their launch functions and `aot_specs()`."""
