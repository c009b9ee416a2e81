"""
# Influence of training points

How much does each training point of a ridge logistic regression matter to
one test prediction? The influence function answers for all of them at
once, with one conjugate-gradient solve against the Hessian and one pass
over the per-example gradients. We then check it by refitting without the
most influential points.
"""

import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize
import tensorflow as tf
from sklearn.datasets import load_breast_cancer

import hessop

# %%
# ## The fitted model
#
# 150 training points with five standardised features, fitted by BFGS. The
# loss hessop sees is the training objective per example, penalty included,
# so that its Hessian is the one the refit would see.

data = load_breast_cancer()
features = data.data[:, :5]
features = (features - features.mean(axis=0)) / features.std(axis=0)
x_all = np.column_stack([np.ones(len(features)), features])
y_all = data.target.astype("float64")
x, y = x_all[:150], y_all[:150]
x_test, y_test = x_all[200], y_all[200]
penalty = 0.01


def objective(b, weights=None):
    eta = x @ b
    losses = np.logaddexp(0, eta) - y * eta
    w = np.ones(len(y)) if weights is None else weights
    return np.sum(w * losses) / len(y) + 0.5 * penalty * b @ b


def fit(weights=None, start=None):
    start = np.zeros(x.shape[1]) if start is None else start
    options = {"gtol": 1e-10}
    return scipy.optimize.minimize(
        objective, start, args=(weights,), method="BFGS", options=options
    ).x


beta_hat = fit()
beta = tf.Variable(beta_hat)


def model(x):
    return tf.linalg.matvec(x, beta)


def nll(y, eta):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=eta)


def penalised(y, eta):  # the training objective, per example
    return nll(y, eta) + 0.5 * penalty * tf.reduce_sum(beta**2)


# %%
# ## Influence scores
#
# `hessop.influence` solves H z = ∇ℓ_test once and returns ∇ℓ_nᵀ z for every
# training point n, from the rows of the `JacobianOperator`.

H = hessop.HessianOperator(model, penalised, (x, y), params=[beta])
J = hessop.JacobianOperator(model, nll, (x, y), params=[beta])  # rows: ∇ℓ_n
p_test = 1 / (1 + np.exp(-x_test @ beta_hat))
test_gradient = (p_test - y_test) * x_test
scores = hessop.influence(H, J, test_gradient)  # one CG solve + one data pass
predicted = -scores / len(y)  # change of the test loss when a point is removed

order = np.argsort(predicted)
print("most helpful training points (removing them raises the test loss most):")
for i in order[::-1][:3]:
    print(f"  #{i:3d} label {int(y[i])}  predicted change {predicted[i]:+.2e}")
print("most harmful training points:")
for i in order[:3]:
    print(f"  #{i:3d} label {int(y[i])}  predicted change {predicted[i]:+.2e}")

# %%
# ## Checked by leaving points out
#
# Refit without each of the ten most helpful and ten most harmful points and
# compare the actual change of the test loss with the prediction.


def test_loss(b):
    eta = x_test @ b
    return np.logaddexp(0, eta) - y_test * eta


checked = np.concatenate([order[:10], order[-10:]])
actual = []
for i in checked:
    weights = np.ones(len(y))
    weights[i] = 0.0
    actual.append(test_loss(fit(weights, beta_hat)) - test_loss(beta_hat))
actual = np.array(actual)
i = order[-1]
print(
    f"check #{i}: leave-one-out change {actual[-1]:+.2e}, "
    f"influence predicted {predicted[i]:+.2e}"
)
r = np.corrcoef(actual, predicted[checked])[0, 1]
print(f"Pearson correlation over {len(checked)} refits: {r:.4f}")

fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.scatter(predicted[checked], actual)
lim = np.abs(np.concatenate([actual, predicted[checked]])).max() * 1.1
ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
ax.set_xlabel("predicted change of the test loss")
ax.set_ylabel("change after refitting without the point")
ax.set_title("Influence against leave-one-out")
plt.show()
