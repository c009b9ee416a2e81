r"""Tune the prior precision (weight decay) and the noise during training by the Laplace evidence.

After Immer et al. (2021), "Scalable marginal likelihood estimation for model
selection in deep learning": every few epochs, a Laplace approximation at the
current weights gives the evidence; τ (and σ) are set to its maximiser, and
the training loss's L2 penalty follows τ through a regulariser that reads it
from a variable, so the compiled training step needs no retracing.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from hessop.stats.laplace import Laplace

__all__ = ["EvidenceCallback", "PriorRegularizer"]


class PriorRegularizer(keras.regularizers.Regularizer):
    r"""The Gaussian prior's penalty in a mean training loss: :math:`\frac{\tau}{2N}\|w\|^2`, τ read from a variable.

    Parameters
    ----------
    prior_precision : keras.Variable
        τ, updated in place (by `EvidenceCallback`).
    num_data : int
        N, the training examples the loss averages over.

    Examples
    --------
    >>> import numpy as np, keras
    >>> from hessop.training.callbacks import PriorRegularizer
    >>> tau = keras.Variable(4.0, trainable=False)
    >>> penalty = PriorRegularizer(tau, num_data=2)
    >>> float(penalty(np.ones(3, dtype="float32")))  # 4 / (2·2) · 3
    3.0
    """

    def __init__(self, prior_precision: Any, num_data: int) -> None:
        self.prior_precision = prior_precision
        self.num_data = int(num_data)

    def __call__(self, x: Any) -> Any:
        scale = keras.ops.cast(self.prior_precision, x.dtype) / (2.0 * self.num_data)
        return scale * keras.ops.sum(keras.ops.square(x))

    def get_config(self) -> dict[str, Any]:
        return {"num_data": self.num_data}


class EvidenceCallback(keras.callbacks.Callback):
    """Every ``every`` epochs, fit a Laplace approximation at the current weights and set τ (and σ) to its evidence's maximiser.

    Give the model's layers ``kernel_regularizer=callback.regularizer`` (and
    the biases too, if the prior covers them) so that training minimises
    the mean loss plus τ‖w‖²/(2N), the MAP objective of the prior whose τ
    the evidence chooses. Each refit records ``(epoch, τ, σ, log evidence)``
    in ``history`` and ``logs["log_evidence"]``.

    Parameters
    ----------
    data : arrays ``(x, y)``, `tf.data.Dataset` or batches
        The training data (N examples).
    every : int
        Epochs between refits.
    prior_precision : float
        The starting τ.
    likelihood, structure, subset, sigma_noise, batch_size
        As for `Laplace` (``structure="kron"`` by default, which scales to
        large networks; ``likelihood="classification"`` by default).
    fit_sigma_noise : bool
        Also fit σ (regression).

    Examples
    --------
    >>> import numpy as np, keras, hessop
    >>> from hessop.training.callbacks import EvidenceCallback
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(64, 2)).astype("float32")
    >>> y = (x[:, :1] > 0).astype("int32")
    >>> callback = EvidenceCallback((x, y), every=2)
    >>> head = keras.layers.Dense(2, kernel_regularizer=callback.regularizer)
    >>> model = keras.Sequential([keras.Input((2,)), head])
    >>> model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> _ = model.fit(x, y, epochs=2, verbose=0, callbacks=[callback])
    >>> len(callback.history), callback.history[0][1] > 0
    (1, True)
    """

    def __init__(
        self,
        data: Any,
        *,
        every: int = 5,
        prior_precision: float = 1.0,
        likelihood: str = "classification",
        structure: str = "kron",
        subset: Any = "all",
        sigma_noise: float = 1.0,
        fit_sigma_noise: bool = False,
        batch_size: int | None = None,
    ) -> None:
        super().__init__()
        from hessop.autodiff.data import Batches

        if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
            msg = f"every: expected a positive int, got {every!r}."
            raise ValueError(msg)
        if fit_sigma_noise and likelihood != "regression":
            msg = "fit_sigma_noise: only a regression likelihood has σ; pass likelihood='regression'."
            raise ValueError(msg)
        self.data, self.every, self.batch_size = data, int(every), batch_size
        self.options = {"likelihood": likelihood, "structure": structure, "subset": subset}
        self.fit_sigma_noise = fit_sigma_noise
        self.sigma_noise = float(sigma_noise)
        self.num_data = Batches(data, batch_size).num_data
        self.prior_precision = keras.Variable(float(prior_precision), trainable=False, name="prior_precision")
        self.regularizer = PriorRegularizer(self.prior_precision, self.num_data)
        self.history: list[tuple[int, float, float, float]] = []
        self.laplace: Laplace | None = None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        la = Laplace(
            self.model,
            None,
            self.data,
            prior_precision=float(self.prior_precision.numpy()),
            sigma_noise=self.sigma_noise,
            batch_size=self.batch_size,
            check_deterministic=False,
            **self.options,
        )
        tau = la.optimize_prior_precision(sigma_noise=self.fit_sigma_noise)
        self.sigma_noise = la.sigma_noise
        self.prior_precision.assign(float(tau))
        evidence = la.log_marginal_likelihood()
        self.history.append((epoch, float(tau), self.sigma_noise, evidence))
        self.laplace = la
        if logs is not None:
            logs["log_evidence"] = evidence
            logs["prior_precision"] = float(tau)
