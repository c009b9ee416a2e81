"""
# Last-layer Laplace of a CNN, and its calibration

A small CNN on the digits data, trained under a Gaussian prior (a
`PriorRegularizer`, so the weights are a MAP estimate). A Laplace
approximation over its last layer only, with a Kronecker-factored posterior,
turns its softmax into a predictive distribution. Is it better calibrated?
We measure the expected calibration error (ECE, 10 confidence bins) on clean
test digits and on the same digits under pixel noise.
"""

import keras
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

import hessop

digits = load_digits()
x = (digits.images / 16.0)[..., None].astype("float32")
y = digits.target.astype("int32")
order = np.random.default_rng(0).permutation(len(x))
train, validation, test = order[:600], order[600:900], order[900:]

# %%
# ## The MAP
#
# The MAP of a Gaussian prior N(0, 1/τ₀): the mean loss plus τ₀‖w‖²/(2N),
# as a Keras regulariser.
prior = hessop.PriorRegularizer(
    keras.Variable(1.0, trainable=False), num_data=len(train)
)
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, activation="relu", kernel_regularizer=prior),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", kernel_regularizer=prior),
        keras.layers.Dense(10, kernel_regularizer=prior),  # logits
    ]
)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss_fn)
model.fit(x[train], y[train], epochs=40, batch_size=64, verbose=0)

# %%
# ## A Bayesian last layer
#
# `subset="last_layer"` runs the convolutional part once and keeps its
# features; the posterior is over the head's 330 weights, with
# `structure="kron"`. The prior precision τ is set by the evidence.

la = hessop.Laplace(
    model,
    None,
    (x[train], y[train]),
    likelihood="classification",
    subset="last_layer",
    structure="kron",
)
tau = la.optimize_prior_precision()
print(
    f"last layer: P = {la.num_params}, optimised prior precision τ = {tau:.3g}, "
    f"log evidence {la.log_marginal_likelihood():.1f}"
)


def ece(probabilities, labels, bins=10):
    """Expected calibration error: |accuracy − confidence| averaged over bins."""
    confidence, predicted = probabilities.max(axis=1), probabilities.argmax(axis=1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            total += inside.mean() * abs(
                (predicted[inside] == labels[inside]).mean() - confidence[inside].mean()
            )
    return total


def nll(probabilities, labels):
    return -np.mean(np.log(probabilities[np.arange(len(labels)), labels] + 1e-12))


# %%
# ## A second τ, by validation
#
# A common choice in practice is the τ with the best validation NLL. Each τ
# on the grid reuses the same Kronecker factors: no pass over the data.

grid = np.logspace(0, 4, 9)
scores = []
for candidate in grid:
    la.prior_precision = float(candidate)
    scores.append(nll(la.predictive(x[validation]), y[validation]))
tau_validation = float(grid[int(np.argmin(scores))])
print(f"prior precision by validation NLL: τ = {tau_validation:.3g}")


def softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# %%
# ## Calibration
#
# A shifted test set as well: the same digits under pixel noise, where the
# MAP stays confident. The predictive probabilities are averaged over
# Monte-Carlo samples of the logits (`link="mc"`), because the probit
# approximation is coarse at these variances, as the last line shows.

noisy = np.clip(
    x[test] + np.random.default_rng(1).normal(0, 0.35, x[test].shape), 0, 1
).astype("float32")
results = {}
for shift, inputs in (("clean", x[test]), ("noisy", noisy)):
    results[f"MAP (softmax), {shift}"] = softmax(
        np.asarray(model.predict(inputs, verbose=0))
    )
    for name, value in (("evidence", tau), ("validation", tau_validation)):
        la.prior_precision = value
        results[f"LA {name} τ, {shift}"] = la.predictive(inputs, link="mc", seed=0)
print(f"test examples: {len(test)}, clean and with pixel noise (sd 0.35)")
print("calibration                    ECE     accuracy  confidence  NLL")
for name, p in results.items():
    accuracy = (p.argmax(1) == y[test]).mean()
    print(
        f"  {name:28s} {ece(p, y[test]):.4f}   {accuracy:.3f}     "
        f"{p.max(1).mean():.3f}       {nll(p, y[test]):.3f}"
    )
la.prior_precision = tau
probit, mc = la.predictive(noisy, link="probit"), results["LA evidence τ, noisy"]
print(
    f"probit against MC (evidence τ, noisy): max |Δp| = {np.abs(probit - mc).max():.3f}"
)

# %%
# What it shows, honestly: on clean digits the MAP is already calibrated, and
# the evidence's τ makes the Laplace predictive underconfident. A confident
# softmax has little curvature, so the posterior stays close to the prior in
# most directions. On the noisy digits the MAP is overconfident; there the
# evidence's τ lowers both the ECE and the NLL at the same accuracy. The τ
# that minimises validation NLL sits at the top of the grid: it keeps the
# MAP's confidence and changes little.
#
# The reliability diagram on the noisy digits: accuracy against confidence,
# per bin.

fig, ax = plt.subplots(figsize=(4.5, 4))
edges = np.linspace(0, 1, 11)
names = ("MAP (softmax), noisy", "LA evidence τ, noisy", "LA validation τ, noisy")
for name in names:
    p = results[name]
    confidence, correct = p.max(1), p.argmax(1) == y[test]
    index = np.clip(np.digitize(confidence, edges) - 1, 0, 9)
    centres = [confidence[index == b].mean() for b in range(10) if np.any(index == b)]
    accuracy = [correct[index == b].mean() for b in range(10) if np.any(index == b)]
    ax.plot(centres, accuracy, "o-", label=f"{name}, ECE {ece(p, y[test]):.3f}")
ax.plot([0, 1], [0, 1], "k:", lw=1)
ax.set_xlabel("confidence")
ax.set_ylabel("accuracy")
ax.legend(loc="upper left", fontsize=8)
fig.tight_layout()
plt.show()
