"""
# KFAC, EKFAC and the diagonal

A small CNN on the digits data (P = 300, so the exact GGN fits in memory).
How close do KFAC, EKFAC and the exact diagonal come to the GGN and to its
layer blocks? We compare their top eigenvalues, the top eigenvalue of each
layer, and how well their damped inverses solve (G + δI) z = b.
"""

import keras
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits

import hessop

# %%
# ## The model and the exact GGN
#
# A strided Conv2D layer and a linear head, in float64 so that the
# comparisons are not blurred by round-off.

digits = load_digits()
x = (digits.images / 16.0)[..., None].astype("float64")
y = digits.target.astype("int32")
keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(3, 3, strides=2, activation="tanh", dtype="float64"),
        keras.layers.Flatten(dtype="float64"),
        keras.layers.Dense(10, dtype="float64"),
    ]
)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_fn)
model.fit(x, y, epochs=10, batch_size=128, verbose=0)
data = (x, y)

# %%
# ## Three approximations
#
# KFAC approximates each layer's block by a Kronecker product A ⊗ G of the
# input and output-gradient covariances; EKFAC keeps KFAC's eigenvectors and
# refits the eigenvalues with a second pass. The exact diagonal costs C
# backward passes per example, not P products.

ggn = hessop.GGNOperator(model, loss_fn, data, batch_size=600)
exact = ggn.to_dense()  # P = 300: small enough to compare against
approximations = {
    "KFAC": hessop.KFACOperator(model, loss_fn, data, batch_size=600),
    "EKFAC": hessop.EKFACOperator(model, loss_fn, data, batch_size=600),
}
diagonal = hessop.diagonal(ggn)  # C backward passes per example, not P products
print(f"P = {exact.shape[0]}, N = {len(x)}")

# %%
# ## Distance to the GGN
#
# Relative Frobenius error against the whole GGN and against its layer
# blocks, which is all a block-diagonal approximation can hope to match.

blocks = hessop.block_diagonal(ggn, "layer")
block_exact = np.zeros_like(exact)
for index in blocks.indices:
    block_exact[np.ix_(index, index)] = exact[np.ix_(index, index)]
print("relative Frobenius error    vs GGN   vs its layer blocks")
for name, op in approximations.items():
    dense = op.to_dense()
    print(
        f"  {name:26s} {np.linalg.norm(dense - exact) / np.linalg.norm(exact):.3f}    "
        f"{np.linalg.norm(dense - block_exact) / np.linalg.norm(block_exact):.3f}"
    )
print(
    f"  {'diagonal':26s} "
    f"{np.linalg.norm(np.diag(diagonal) - exact) / np.linalg.norm(exact):.3f}"
)

# %%
# ## Spectra
#
# The top eigenvalues of each, and the top eigenvalue of each layer block.

top = {"GGN": np.linalg.eigvalsh(exact)[::-1][:5]}
top.update({name: op.eigenvalues()[::-1][:5] for name, op in approximations.items()})
top["diagonal"] = np.sort(diagonal)[::-1][:5]
print("top-5 eigenvalues:")
for name, values in top.items():
    print(f"  {name:9s}" + "".join(f"{v:10.4f}" for v in values))
print("top eigenvalue per layer (exact GGN blocks):")
for name, (values, _) in blocks.eigen(k=1).items():
    print(f"  {name:30s} {values[0]:.4f}")

# %%
# ## Inverses
#
# Solve (G + δI) z = b with each approximation's damped inverse, and compare
# the log-determinants that a Laplace evidence would use.

damping = 1e-3
b = np.random.default_rng(0).normal(size=exact.shape[0])
z = np.linalg.solve(exact + damping * np.eye(len(b)), b)
inverses = {
    name: op.inverse(damping, heuristic="exact") for name, op in approximations.items()
}
inverses["diagonal"] = lambda v: v / (diagonal + damping)
print(
    f"inverse quality, damping {damping}: "
    "relative error of (A + δI)⁻¹ b against (G + δI)⁻¹ b"
)
for name, inverse in inverses.items():
    approx = inverse(b) if callable(inverse) else inverse @ b
    print(f"  {name:9s} {np.linalg.norm(approx - z) / np.linalg.norm(z):.3f}")
print(
    "log det(G + δI): "
    f"exact {np.linalg.slogdet(exact + damping * np.eye(len(b)))[1]:.1f}, "
    + ", ".join(
        f"{name} {op.logdet(damping):.1f}" for name, op in approximations.items()
    )
)

# %%
# EKFAC is closer than KFAC to every layer block, as it must be. Both keep
# about a third of the solve error of the diagonal; none of them reproduces
# the top of the spectrum, which is what `hessop.low_rank` is for. The
# matrices themselves show why: KFAC has the block structure of the GGN's
# diagonal blocks but no coupling between layers.

fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
shown = {"exact GGN": exact, **{n: op.to_dense() for n, op in approximations.items()}}
scale = np.abs(exact).max()
for ax, (name, matrix) in zip(axes, shown.items()):
    image = ax.imshow(np.log10(np.abs(matrix) / scale + 1e-6), vmin=-6, vmax=0)
    ax.set_title(name)
    ax.set_xticks([])
    ax.set_yticks([])
fig.colorbar(image, ax=axes, shrink=0.8, label="log10 |entry| / max")
plt.show()
