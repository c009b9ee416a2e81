"""The TensorFlow side shared by every data-pass operator.

- `engine`: compiled per-batch products (HVPs, JVPs, VJPs, per-example rows),
  flattening of the parameters, the HVP mode search;
- `passes`: whole data passes in one compiled function;
- `data`: arrays, Datasets and re-iterables as one view of batches;
- `params`, `losses`, `moments`, `pfor`, `distribute`: parameter lists,
  Keras losses per example, exact second derivatives through moments, the
  opt-in vectorisation rules and `tf.distribute` support.
"""
