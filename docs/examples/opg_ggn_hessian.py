"""
# OPG vs GGN vs Hessian

Three curvature matrices of one digits MLP, side by side: the Hessian H, the
generalised Gauss-Newton G = Jᵀ∇²ℓ J, which drops the term with the second
derivatives of the network's outputs, and the outer product of per-example
gradients (OPG, the empirical Fisher). We compare their top-5 eigenvalues,
and add the one-pass randomised (`ipca`) route for the OPG.
"""

import keras
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

import hessop

# %%
# ## A trained MLP
#
# 64 inputs, 16 tanh units and ten logits: P = 1,210 parameters.

digits = load_digits()
x = (digits.data / 16.0).astype("float32")
y = digits.target.astype("int32")
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((64,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.Dense(10),
    ]
)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_fn)
model.fit(x, y, epochs=15, batch_size=128, verbose=0)

# %%
# ## Three operators, one interface
#
# Each is a `LinearOperator`; `hessop.eigen` runs Lanczos on any of them. The
# `ipca` method instead reads the OPG's per-example gradients once and keeps
# a randomised sketch of them.

operators = {
    "Hessian": hessop.HessianOperator(model, loss_fn, (x, y), batch_size=600),
    "GGN": hessop.GGNOperator(model, loss_fn, (x, y), batch_size=600),
    "OPG": hessop.OPGOperator(model, loss_fn, (x, y), batch_size=600),
}
k = 5
tops = {name: hessop.eigen(op, k=k, tol=1e-6)[0] for name, op in operators.items()}
tops["OPG (ipca)"] = hessop.eigen(operators["OPG"], k=k, method="ipca", oversample=40)[
    0
]
print(f"top-{k} eigenvalues, P = {operators['Hessian'].shape[0]:,}:")
print("rank " + "".join(f"{name:>14}" for name in tops))
for i in range(k):
    print(f"{i + 1:>4} " + "".join(f"{tops[name][i]:>14.5f}" for name in tops))
gap = np.linalg.norm(tops["Hessian"] - tops["GGN"]) / np.linalg.norm(tops["Hessian"])
print(
    f"relative gap Hessian vs GGN on the top-{k}: {gap:.2%} "
    "(the dropped output-curvature term)"
)

# %%
# At a well-trained minimum the GGN is close to the Hessian at the top of the
# spectrum. The OPG, a different matrix altogether, is not: it is scaled by
# the squared residuals rather than by the loss's curvature.

fig, ax = plt.subplots(figsize=(6, 3.5))
for (name, values), marker in zip(tops.items(), "os^x"):
    ax.plot(range(1, k + 1), values, marker=marker, label=name)
ax.set_xticks(range(1, k + 1))
ax.set_xlabel("rank")
ax.set_ylabel("eigenvalue")
ax.set_title("Top eigenvalues of three curvature matrices")
ax.legend()
plt.show()
