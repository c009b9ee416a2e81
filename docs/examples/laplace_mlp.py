"""Tutorial 3: a Laplace approximation for a small MLP, with predictive uncertainty."""

from _shared import output_dir

out = output_dir(__doc__)

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import hessop

rng = np.random.default_rng(0)
x = np.concatenate([rng.uniform(-3, -1, 40), rng.uniform(1, 3, 40)])[:, None]
noise = 0.1
y = np.sin(x[:, 0]) + noise * rng.normal(size=len(x))

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((1,), dtype="float64"),
        keras.layers.Dense(16, activation="tanh", dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ]
)


def nll(y_true, f):  # Gaussian negative log-likelihood with known noise
    return 0.5 * tf.square((y_true - f[:, 0]) / noise) + 0.5 * np.log(
        2 * np.pi * noise**2
    )


prior_precision = 1.0
optimizer = keras.optimizers.Adam(1e-2)


@tf.function
def train_step():  # MAP: mean NLL + prior penalty / N
    with tf.GradientTape() as tape:
        penalty = (
            0.5
            * prior_precision
            * tf.add_n([tf.reduce_sum(v**2) for v in model.trainable_variables])
        )
        loss = tf.reduce_mean(nll(y, model(x))) + penalty / len(x)
    optimizer.apply_gradients(
        zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
    )


for _ in range(3000):
    train_step()

la = hessop.Laplace(
    model, nll, (x, y), curvature="ggn", prior_precision=prior_precision
)
print(la)
print(
    f"log marginal likelihood at tau = {prior_precision}: "
    f"{la.log_marginal_likelihood():.3f}"
)
tau = la.optimize_prior_precision()
print(
    f"optimised prior precision tau = {tau:.4g}: "
    f"log marginal likelihood {la.log_marginal_likelihood():.3f}"
)

grid = np.linspace(-5, 5, 200)[:, None]
mean, cov = la.predictive(grid)
sd = np.sqrt(cov[:, 0, 0] + noise**2)
inside = np.abs(grid[:, 0]) < 3
print(
    f"predictive sd: {sd[np.abs(grid[:, 0] - 2) < 0.5].mean():.3f} near the data, "
    f"{sd[~inside].mean():.3f} far from it"
)

fig, ax = plt.subplots(figsize=(7, 4))
ax.fill_between(
    grid[:, 0],
    mean[:, 0] - 2 * sd,
    mean[:, 0] + 2 * sd,
    alpha=0.3,
    label="±2 sd (linearised Laplace)",
)
ax.plot(grid[:, 0], mean[:, 0], label="MAP prediction")
ax.scatter(x[:, 0], y, s=8, color="k", label="data")
ax.set_xlabel("x")
ax.set_ylabel("y")
ax.set_title("Linearised Laplace predictive of a 1-16-1 MLP")
ax.legend()
fig.savefig(out / "laplace_mlp.png", dpi=120, bbox_inches="tight")
print(f"wrote {out / 'laplace_mlp.png'}")
