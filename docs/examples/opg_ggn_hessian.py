"""Tutorial 4: OPG vs GGN vs Hessian on the same model: top eigenvalues side by side."""

from _shared import output_dir

output_dir(__doc__)

import keras
import numpy as np
from sklearn.datasets import load_digits

import hessop

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

operators = {
    "Hessian": hessop.HessianOperator(model, loss_fn, (x, y), batch_size=600),
    "GGN": hessop.GGNOperator(model, loss_fn, (x, y), batch_size=600),
    "OPG": hessop.OPGOperator(model, loss_fn, (x, y), batch_size=600),
}
k = 5
tops = {name: hessop.eigen(op, k=k, tol=1e-6)[0] for name, op in operators.items()}
tops["OPG (ipca, one pass)"] = hessop.eigen(
    operators["OPG"], k=k, method="ipca", oversample=40
)[0]
print(f"top-{k} eigenvalues, P = {operators['Hessian'].shape[0]:,}:")
print("rank " + "".join(f"{name:>22}" for name in tops))
for i in range(k):
    print(f"{i + 1:>4} " + "".join(f"{tops[name][i]:>22.5f}" for name in tops))
gap = np.linalg.norm(tops["Hessian"] - tops["GGN"]) / np.linalg.norm(tops["Hessian"])
print(
    f"relative gap Hessian vs GGN on the top-{k}: {gap:.2%} "
    "(the dropped output-curvature term)"
)
