"""
# Curvature of a small transformer

A one-block transformer (token and position embeddings, two-head
self-attention, layer normalisation and a feed-forward layer) trained to
count a token in short sequences. We look at the top eigenvalues of its
Hessian, at its spectral density next to that of the GGN, and at how the
curvature divides between the layers.
"""

import keras
import matplotlib.pyplot as plt
import numpy as np

import hessop

# %%
# ## A counting task
#
# Sequences of 10 tokens from a vocabulary of 8. The label is how often token
# 0 occurs, capped at 3: the model has to attend to every position.

rng = np.random.default_rng(0)
length, vocabulary, width = 10, 8, 16
tokens = rng.integers(0, vocabulary, size=(512, length)).astype("int32")
labels = np.minimum((tokens == 0).sum(axis=1), 3).astype("int32")


class Positions(keras.layers.Layer):
    """A learned position embedding, added to the token embeddings."""

    def build(self, input_shape):
        self.table = self.add_weight(shape=input_shape[1:], initializer="normal")

    def call(self, h):
        return h + self.table


keras.utils.set_random_seed(0)
inputs = keras.Input((length,), dtype="int32")
h = keras.layers.Embedding(vocabulary, width, name="tokens")(inputs)
h = Positions(name="positions")(h)
attention = keras.layers.MultiHeadAttention(2, width // 2, name="attention")
h = keras.layers.LayerNormalization(name="norm_1")(h + attention(h, h))
hidden = keras.layers.Dense(32, activation="gelu", name="ffn_in")(h)
h = h + keras.layers.Dense(width, name="ffn_out")(hidden)
h = keras.layers.LayerNormalization(name="norm_2")(h)
h = keras.layers.GlobalAveragePooling1D()(h)
outputs = keras.layers.Dense(4, name="head")(h)
model = keras.Model(inputs, outputs)

loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
model.compile(optimizer=keras.optimizers.Adam(3e-3), loss=loss_fn, metrics=["accuracy"])
history = model.fit(tokens, labels, epochs=30, batch_size=64, verbose=0)
accuracy = history.history["accuracy"][-1]
print(f"P = {model.count_params():,}, training accuracy {accuracy:.3f}")

# %%
# ## Top eigenvalues
#
# The Hessian of the mean training loss, by Lanczos on Hessian-vector
# products. The GGN, Jᵀ∇²ℓ J, is positive semi-definite by construction; the
# Hessian need not be, and its negative eigenvalues measure how far the
# network sits from a minimum in their directions (the densities below show
# how much of the spectrum lies there).

data = (tokens, labels)
H = hessop.HessianOperator(model, loss_fn, data, batch_size=512)
G = hessop.GGNOperator(model, loss_fn, data, batch_size=512)
top_h = hessop.eigen(H, k=5, tol=1e-5)[0]
top_g = hessop.eigen(G, k=5, tol=1e-5)[0]
print("top-5 eigenvalues")
print("  Hessian " + "".join(f"{v:9.4f}" for v in top_h))
print("  GGN     " + "".join(f"{v:9.4f}" for v in top_g))

# %%
# ## Spectral densities
#
# Stochastic Lanczos quadrature: 25 Lanczos steps for each of 4 random
# probes, about a hundred products per operator.

densities = {
    name: hessop.spectral_density(op, num_lanczos=25, num_probes=4, seed=0)
    for name, op in (("Hessian", H), ("GGN", G))
}
for name, density in densities.items():
    print(f"{name}, {density}")
fig, ax = plt.subplots(figsize=(7, 3.5))
for name, density in densities.items():
    grid, values = density.grid, density.density
    ax.semilogy(grid, values, label=name)
ax.set_ylim(1e-5, 10)
ax.set_xlabel("eigenvalue")
ax.set_ylabel("density")
ax.set_title("Spectral density of a small transformer")
ax.legend()
plt.show()

# %%
# ## Curvature per layer
#
# `block_diagonal(op, "layer")` splits an operator into its layer blocks, each
# a `LinearOperator` of its own; Hutch++ estimates each block's trace from
# 30 products.


def layer_traces(op):
    blocks = hessop.block_diagonal(op, "layer")
    return {
        name: hessop.trace(blocks.block(name), num_matvecs=30) for name in blocks.names
    }


hessian_traces, ggn_traces = layer_traces(H), layer_traces(G)
print(f"{'layer':28s} {'trace H':>9s} {'trace GGN':>10s}")
for name in ggn_traces:
    print(f"{name:28s} {hessian_traces[name]:9.4f} {ggn_traces[name]:10.4f}")

fig, ax = plt.subplots(figsize=(7, 3.5))
names = list(ggn_traces)
rows = np.arange(len(names))
ax.barh(rows - 0.2, [hessian_traces[n] for n in names], 0.4, label="Hessian")
ax.barh(rows + 0.2, [ggn_traces[n] for n in names], 0.4, label="GGN")
ax.set_yticks(rows, names)
ax.invert_yaxis()
ax.set_xlabel("trace of the layer's block")
ax.set_title("Curvature per layer")
ax.legend()
plt.show()

# %%
# Most of the curvature sits in the embeddings and in attention's value and
# output projections; the query and key projections, which only shape the
# attention weights, have little. For the last layer norm
# and the head the two traces agree: the outputs are linear in those
# parameters, so the Hessian's extra term, which weights the outputs' second
# derivatives by the loss gradient, vanishes on their blocks. Elsewhere the
# Hessian carries more curvature than the GGN, and its top eigenvalue is
# larger too.
