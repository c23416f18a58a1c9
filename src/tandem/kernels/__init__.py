"""Native CPU kernels: C sources compiled on first use (`native.py`) and a Python wrapper for
each (attention, AMX linear, elementwise, the fused decoder, block hashing), each with a fallback
(PyTorch ops, or the Python reference for block hashing) when the compiler or the CPU feature is
missing."""
