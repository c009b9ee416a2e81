"""Dense matrices from operators.

``columns``: columns by blocks of unit vectors (numpy only); ``kronecker``:
the closed-form block of a Dense layer's kernel (TensorFlow).
"""
