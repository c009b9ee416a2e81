"""The TensorFlow side shared by every data-pass operator.

- `engine`: compiled per-batch products (HVPs, JVPs, VJPs, per-example rows),
  flattening of the parameters, the HVP mode search;
- `passes`: whole data passes in one compiled function;
- `data`: arrays, Datasets and re-iterables as one view of batches;
- `params`, `losses`, `moments`, `distribute`: parameter lists, Keras losses
  per example, exact second derivatives through moments and `tf.distribute`;
- `vectorize`: what wraps `tf.vectorized_map`; `pfor`: the opt-in
  vectorisation rules (TensorFlow's private registry), imported only when
  ``HESSOP_PFOR_RULES=1``.
"""
