"""
# Standard errors of a logistic regression

A logistic regression written in plain TensorFlow, fitted by Newton's method
with hessop's own Hessian and gradient. Its summary tables give the
model-based standard errors, from the inverse Hessian, and the robust
(sandwich, HC0) ones, which stay valid when the model is misspecified.
"""

import matplotlib.pyplot as plt
import numpy as np
import tensorflow as tf
from sklearn.datasets import load_breast_cancer

import hessop

# %%
# ## The model
#
# Three standardised features of the breast-cancer data and an intercept.
# Any TensorFlow callable works as a model; here it is one matrix-vector
# product with a `tf.Variable`.

data = load_breast_cancer()
columns = [0, 1, 4]  # mean radius, mean texture, mean smoothness
features = data.data[:, columns]
features = (features - features.mean(axis=0)) / features.std(axis=0)
x = np.column_stack([np.ones(len(features)), features])
y = data.target.astype("float64")
names = ["intercept"] + [data.feature_names[c] for c in columns]

beta = tf.Variable(np.zeros(x.shape[1]))


def model(x):
    return tf.linalg.matvec(x, beta)


def nll(y, logits):  # per-example negative log-likelihood
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=logits)


# %%
# ## Maximum likelihood by Newton's method
#
# The operator reads `beta` at every product, so one operator serves every
# Newton step.

H = hessop.HessianOperator(model, nll, (x, y), params=[beta])
G = hessop.OPGOperator(model, nll, (x, y), params=[beta])
for step in range(25):  # noqa: B007 - step is read after the loop
    loss, grad = H.loss_and_gradient()
    newton_step = np.linalg.solve(H.to_dense(), grad)
    beta.assign_sub(newton_step)
    if np.linalg.norm(newton_step) < 1e-10:
        break
print(f"Newton converged in {step + 1} steps; mean NLL {loss:.5f}")

# %%
# ## Two kinds of standard errors
#
# With the mean loss, the covariance of the estimate is (N H)⁻¹. The sandwich
# replaces it by H⁻¹ G H⁻¹ / N, where G is the outer product of the
# per-example gradients (`OPGOperator`).

plain = hessop.covariance(H)
robust = hessop.covariance(H, opg=G)
print("Model-based standard errors, Cov = (N H)^-1:")
print(hessop.summary([beta], plain, names=names))
print("\nRobust (sandwich, HC0) standard errors, Cov = H^-1 G H^-1 / N:")
print(hessop.summary([beta], robust, names=names))

# %%
# The two kinds of 95% intervals side by side. They agree closely: the
# logistic model fits these features well.

estimate = beta.numpy()
fig, ax = plt.subplots(figsize=(7, 3))
for shift, cov, label in [(-0.1, plain, "model-based"), (0.1, robust, "sandwich")]:
    half = 1.96 * np.sqrt(cov.diagonal())
    rows = np.arange(len(names)) + shift
    ax.errorbar(estimate, rows, xerr=half, fmt="o", capsize=3, label=label)
ax.set_yticks(range(len(names)), names)
ax.axvline(0, color="grey", lw=0.8)
ax.set_xlabel("coefficient, with its 95% interval")
ax.legend()
plt.show()
