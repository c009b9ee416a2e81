"""Curvature during training: a Keras callback that refits the Laplace evidence and the prior it implies."""
