"""Tutorial 2: standard errors, plain and robust (sandwich), of a logistic model."""

from _shared import output_dir

output_dir(__doc__)

import numpy as np
import tensorflow as tf
from sklearn.datasets import load_breast_cancer

import hessop

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


# Maximum likelihood by Newton's method with hessop's own Hessian and gradient.
# The operator reads beta at every product, so one operator serves every step.
H = hessop.HessianOperator(model, nll, (x, y), params=[beta])
G = hessop.OPGOperator(model, nll, (x, y), params=[beta])
for step in range(25):  # noqa: B007 - step is read after the loop
    loss, grad = H.loss_and_gradient()
    newton_step = np.linalg.solve(H.to_dense(), grad)
    beta.assign_sub(newton_step)
    if np.linalg.norm(newton_step) < 1e-10:
        break
print(f"Newton converged in {step + 1} steps; mean NLL {H.loss_and_gradient()[0]:.5f}")

print("\nModel-based standard errors, Cov = (N H)^-1:")
print(hessop.summary([beta], hessop.covariance(H), names=names))
print("\nRobust (sandwich, HC0) standard errors, Cov = H^-1 G H^-1 / N:")
print(hessop.summary([beta], hessop.covariance(H, opg=G), names=names))
