"""Sparse attention kernels: the dense reference, the blockwise PyTorch path and the generated Triton kernels."""
