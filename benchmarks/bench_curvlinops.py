"""hessop (TensorFlow) vs curvlinops (PyTorch) on identical weights: agreement and time.

Optional: needs ``pip install torch curvlinops-for-pytorch`` (never a hessop
dependency). Model: MLP 784-128-64-10 (tanh), softmax cross-entropy,
N = 2048, batch 512, float32. The Keras weights are copied into an equivalent
``torch.nn.Sequential`` (kernels transposed) and vectors are mapped between
the two flat layouts, so both libraries multiply the same matrix. Timed in
alternating groups (each library's thread pool idles between groups).

    python benchmarks/bench_curvlinops.py [--repeats 7]
"""

from __future__ import annotations

import argparse

import keras
import numpy as np
from _common import grouped, machine_info, ms, table
from bench_hvp import data, mlp

import hessop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    try:
        import curvlinops
        import torch
    except ImportError:
        print("skipped: install torch and curvlinops-for-pytorch to compare")
        return
    print(machine_info() + f", torch {torch.__version__}, curvlinops 3 ({curvlinops.__name__})")
    model = mlp()
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    x, y = data(2048)
    bs = 512

    layers, kernels = [], []
    dense_layers = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    for i, layer in enumerate(dense_layers):
        kernel, bias = (np.asarray(w) for w in layer.get_weights())
        linear = torch.nn.Linear(kernel.shape[0], kernel.shape[1])
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        layers.append(linear)
        if i < len(dense_layers) - 1:
            layers.append(torch.nn.Tanh())
        kernels.append(kernel.shape)
    net = torch.nn.Sequential(*layers)
    params = [p for p in net.parameters() if p.requires_grad]
    batches = [(torch.from_numpy(x[i : i + bs]), torch.from_numpy(y[i : i + bs]).long()) for i in range(0, len(x), bs)]
    ce = torch.nn.CrossEntropyLoss(reduction="mean")

    def to_torch(v: np.ndarray) -> torch.Tensor:
        parts, start = [], 0
        for shape in kernels:
            size = shape[0] * shape[1]
            parts.append(v[start : start + size].reshape(shape).T.reshape(-1))
            parts.append(v[start + size : start + size + shape[1]])
            start += size + shape[1]
        return torch.from_numpy(np.concatenate(parts).astype(np.float32))

    pairs = {
        "Hessian": (
            hessop.HessianOperator(model, loss_fn, (x, y), batch_size=bs),
            curvlinops.HessianLinearOperator(net, ce, params, batches),
        ),
        "GGN": (
            hessop.GGNOperator(model, loss_fn, (x, y), batch_size=bs),
            curvlinops.GGNLinearOperator(net, ce, params, batches),
        ),
    }
    P = pairs["Hessian"][0].shape[0]
    v = np.random.default_rng(0).normal(size=P).astype(np.float32)
    V = np.random.default_rng(1).normal(size=(P, 10)).astype(np.float32)
    vt = to_torch(v)
    Vt = torch.stack([to_torch(V[:, j]) for j in range(10)], dim=1)
    rows = []
    for name, (ours, theirs) in pairs.items():
        mine = to_torch(ours @ v).numpy()
        other = (theirs @ vt).detach().numpy()
        agreement = float(np.max(np.abs(mine - other)) / np.max(np.abs(other)))
        result = grouped(
            {
                "hessop": lambda ours=ours: ours @ v,
                "curvlinops": lambda theirs=theirs: theirs @ vt,
                "hessop block 10": lambda ours=ours: ours @ V,
                "curvlinops block 10": lambda theirs=theirs: theirs @ Vt,
            },
            repeats=args.repeats,
        )
        rows.append(
            [
                name,
                f"{agreement:.1e}",
                ms(result["hessop"]["median"]),
                ms(result["curvlinops"]["median"]),
                round(result["hessop"]["median"] / result["curvlinops"]["median"], 2),
                ms(result["hessop block 10"]["median"]),
                ms(result["curvlinops block 10"]["median"]),
                round(result["hessop block 10"]["median"] / result["curvlinops block 10"]["median"], 2),
            ]
        )
    print(f"model: MLP 784-128-64-10 tanh, N = 2048, batch 512, float32, P = {P:,}")
    print(
        table(
            [
                "operator",
                "max rel. difference",
                "hessop ms",
                "curvlinops ms",
                "hessop ÷ curvlinops",
                "hessop block-10 ms",
                "curvlinops block-10 ms",
                "block ratio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
