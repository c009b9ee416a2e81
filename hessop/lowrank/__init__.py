"""Low-rank and full-rank spectral operators (``operators``) with their numba kernels; no TensorFlow."""
