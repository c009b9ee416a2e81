"""One worker of the MultiWorkerMirroredStrategy test (run by tests/test_distribute.py).

Usage: python _multiworker_worker.py OUTPUT.npz   (TF_CONFIG set by the caller)
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(output: str) -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    import hessop

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(45, 5)), rng.integers(0, 3, size=45)

    def build():
        keras.utils.set_random_seed(7)
        return keras.Sequential(
            [
                keras.Input((5,), dtype="float64"),
                keras.layers.Dense(4, activation="tanh", dtype="float64"),
                keras.layers.Dense(3, dtype="float64"),
            ]
        )

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")
    with strategy.scope():
        model = build()
    H = hessop.HessianOperator(model, loss, (x, y), batch_size=16, strategy=strategy)
    vector = np.random.default_rng(1).normal(size=H.shape[0])
    distributed = H @ vector
    reference = hessop.HessianOperator(build(), loss, (x, y), batch_size=16, strategy=tf.distribute.get_strategy()) @ vector
    np.savez(output, distributed=distributed, reference=reference, replicas=strategy.num_replicas_in_sync)


if __name__ == "__main__":
    main(sys.argv[1])
