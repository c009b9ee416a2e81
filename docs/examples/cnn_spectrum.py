"""Tutorial 1: eigenvalues and spectral density of a Keras CNN's Hessian on digits."""

from _shared import output_dir

out = output_dir(__doc__)

import keras
import matplotlib

matplotlib.use("Agg")
from sklearn.datasets import load_digits

import hessop

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

H = hessop.HessianOperator(model, loss_fn, (x, y), batch_size=512)
print(f"CNN with P = {H.shape[0]:,} parameters, training loss {H.loss:.4f}")

# Lanczos: matvecs only, no P×P matrix
values, vectors = hessop.eigen(H, k=5, tol=1e-6)
for i, value in enumerate(values, 1):
    print(f"eigenvalue {i}: {value:.5f}")

density = hessop.spectral_density(H, num_lanczos=30, num_probes=6, seed=0)
print(density)
print(f"trace (Hutch++, 60 matvecs): {hessop.trace(H, num_matvecs=60):.4f}")

ax = hessop.plot_spectrum(density, values, title="Hessian spectrum of a digits CNN")
ax.figure.savefig(out / "cnn_spectrum.png", dpi=120, bbox_inches="tight")
print(f"wrote {out / 'cnn_spectrum.png'}")
