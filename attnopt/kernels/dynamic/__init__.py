"""Dynamic (content-based) block-sparse attention: block lists chosen at run time, the kernels that run them."""
