"""Structured curvature on the numpy side: Kronecker-factored block-diagonal operators."""
