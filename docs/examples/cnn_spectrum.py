"""
# A CNN's Hessian spectrum

A small convolutional network on the digits data set (8×8 images, ten classes).
We compute the top eigenvalues of the Hessian of its training loss by Lanczos,
its trace by Hutch++ and its spectral density by stochastic Lanczos quadrature,
all from Hessian-vector products: no P×P matrix is ever formed.
"""

import keras
from sklearn.datasets import load_digits

import hessop

# %%
# ## Train the model
#
# A Conv2D layer with four 3×3 filters and a linear head, trained for a few
# epochs with Adam. The loss is built with `reduction=None`: hessop wants the
# loss per example and averages it itself.

digits = load_digits()
x = (digits.images / 16.0).astype("float32")[..., None]  # (1797, 8, 8, 1)
y = digits.target.astype("int32")

keras.utils.set_random_seed(0)
model = keras.Sequential(
    [
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(4, 3, activation="tanh"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ]
)
loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss_fn)
model.fit(x, y, epochs=10, batch_size=128, verbose=0)

# %%
# ## The Hessian as an operator
#
# `HessianOperator` is a `scipy.sparse.linalg.LinearOperator`. Each product
# `H @ v` is one pass over the data in batches of 512.

H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=512)
print(f"CNN with P = {H.shape[0]:,} parameters, training loss {H.loss:.4f}")

# %%
# ## Top eigenvalues, trace and density
#
# `hessop.eigen` runs Lanczos (scipy's `eigsh`) on the operator. The spectral
# density needs 30 Lanczos steps for each of 6 random probes.

values, vectors = hessop.eigen(H, k=5, tol=1e-6)
for i, value in enumerate(values, 1):
    print(f"eigenvalue {i}: {value:.5f}")

density = hessop.spectral_density(H, num_lanczos=30, num_probes=6, seed=0)
print(density)
print(f"trace (Hutch++, 60 matvecs): {hessop.trace(H, num_matvecs=60):.4f}")

# %%
# The density is smoothed with a Gaussian kernel; the top eigenvalues are
# marked. Most of the mass sits near zero, with a few outliers: the familiar
# bulk-and-outliers shape of trained networks.

ax = hessop.plot_spectrum(density, values, title="Hessian spectrum of a digits CNN")
