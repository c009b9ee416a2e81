"""Eigenpairs, trace, diagonal and spectral density of any symmetric LinearOperator; no TensorFlow."""
