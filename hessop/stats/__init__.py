"""Standard errors, sandwich covariances, influence and Laplace posteriors; TensorFlow only inside functions that need a model."""
