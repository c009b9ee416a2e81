"""Tutorial 5: influence of training points on a test prediction.

A ridge logistic regression.
"""

from _shared import output_dir

output_dir(__doc__)

import numpy as np
import scipy.optimize
import tensorflow as tf
from sklearn.datasets import load_breast_cancer

import hessop

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


beta_hat = scipy.optimize.minimize(
    objective, np.zeros(x.shape[1]), method="BFGS", options={"gtol": 1e-10}
).x
beta = tf.Variable(beta_hat)


def model(x):
    return tf.linalg.matvec(x, beta)


def nll(y, eta):
    return tf.nn.sigmoid_cross_entropy_with_logits(labels=y, logits=eta)


def penalised(y, eta):  # the training objective, per example
    return nll(y, eta) + 0.5 * penalty * tf.reduce_sum(beta**2)


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


def test_loss(b):
    eta = x_test @ b
    return np.logaddexp(0, eta) - y_test * eta


i = order[-1]
weights = np.ones(len(y))
weights[i] = 0.0
refit = scipy.optimize.minimize(
    objective, beta_hat, args=(weights,), method="BFGS", options={"gtol": 1e-10}
).x
print(
    f"check #{i}: leave-one-out change {test_loss(refit) - test_loss(beta_hat):+.2e}, "
    f"influence predicted {predicted[i]:+.2e}"
)
