"""
# Laplace approximation of an MLP

A 1-16-1 MLP fitted to two clusters of noisy sine data, with a gap between
them. A Laplace approximation around the trained weights (MAP) gives a
Gaussian posterior whose precision is the GGN of the loss plus the prior's.
Its linearised predictive is narrow near the data and wide in the gap and
beyond it, which is what we want from an uncertainty estimate.
"""

import keras
import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf

import hessop

# %%
# ## Data and the MAP fit
#
# The loss is the Gaussian negative log-likelihood with a known noise
# standard deviation, per example. The MAP estimate adds the prior's penalty,
# ½τ‖θ‖², divided by N because the loss is a mean.

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
        weights = model.trainable_variables
        penalty = (
            0.5 * prior_precision * tf.add_n([tf.reduce_sum(v**2) for v in weights])
        )
        loss = tf.reduce_mean(nll(y, model(x))) + penalty / len(x)
    optimizer.apply_gradients(zip(tape.gradient(loss, weights), weights))


for _ in range(3000):
    train_step()

# %%
# ## The posterior and its prior precision
#
# `Laplace` builds the exact GGN (P = 49, so a dense matrix is cheap here) and
# evaluates the log marginal likelihood (the evidence). Maximising it over the
# prior precision τ reuses the same curvature: no further pass over the data.

la = hessop.Laplace(
    model, nll, (x, y), curvature="ggn", prior_precision=prior_precision
)
print(f"Laplace posterior over P = {la.num_params} parameters, N = {len(x)}")
print(
    f"log marginal likelihood at tau = {prior_precision}: "
    f"{la.log_marginal_likelihood():.3f}"
)
tau = la.optimize_prior_precision()
print(
    f"optimised prior precision tau = {tau:.4g}: "
    f"log marginal likelihood {la.log_marginal_likelihood():.3f}"
)

# %%
# ## The predictive band
#
# `predictive` linearises the network around the MAP: the variance of f(x)
# is J(x) Σ J(x)ᵀ, to which we add the noise variance.

grid = np.linspace(-5, 5, 200)[:, None]
mean, cov = la.predictive(grid)
sd = np.sqrt(cov[:, 0, 0] + noise**2)
inside = np.abs(grid[:, 0]) < 3
print(
    f"predictive sd: {sd[np.abs(grid[:, 0] - 2) < 0.5].mean():.3f} near the data, "
    f"{sd[~inside].mean():.3f} far from it"
)

fig, ax = plt.subplots(figsize=(7, 4))
band = (mean[:, 0] - 2 * sd, mean[:, 0] + 2 * sd)
ax.fill_between(grid[:, 0], *band, alpha=0.3, label="±2 sd (linearised Laplace)")
ax.plot(grid[:, 0], mean[:, 0], label="MAP prediction")
ax.scatter(x[:, 0], y, s=8, color="k", label="data")
ax.set_xlabel("x")
ax.set_ylabel("y")
ax.set_title("Linearised Laplace predictive of a 1-16-1 MLP")
ax.legend()
plt.show()
