"""Teacher training throughput: jaxclean's jitted step against a plain PyTorch loop, one run.

Both train the same CIFAR-style ResNet (same depth, width, batch norm, Adam) on the same
Fashion-MNIST batches on this CPU, and the script prints images/s of each and their ratio.
PyTorch runs eager with channels_last and 2 threads, its fastest set-up on the 2-core machines.

  python benchmarks/train_throughput.py [--depth 20 --width 16 --batch 128 --steps 60]

Needs the [bench] extra (torch). Results are recorded in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def load_batches(data_dir: str, batch: int, steps: int):
    from jaxclean.data import load_idx_dir

    train = load_idx_dir(data_dir)["train"]
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train))[: batch * steps]
    images = train.images[order].reshape(steps, batch, 28, 28, 1)
    labels = train.labels[order].reshape(steps, batch)
    return images, labels


def jax_throughput(images, labels, depth, width, warmup) -> float:
    import jax
    import optax

    from jaxclean import augment, sharding, steps, train
    from jaxclean.models.resnet import cifar_resnet

    mesh = sharding.make_mesh()
    model = cifar_resnet(depth, 10, width)
    tx = optax.adam(1e-3)
    state = train.create_train_state(model, tx, images.shape[2:], jax.random.key(0), mesh)
    step = train.jit_step(functools.partial(steps.train_step, augment=augment.Augment()), mesh)
    key = jax.random.key(0)
    batch_size = images.shape[1]
    batches = [
        sharding.to_global(
            {"image": x, "label": y, "index": np.arange(batch_size, dtype=np.int32)}, mesh
        )
        for x, y in zip(images, labels)
    ]
    for batch in batches[:warmup]:
        state, metrics = step(state, batch, key)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches[warmup:]:
        state, metrics = step(state, batch, key)
    jax.block_until_ready((state, metrics))
    return (len(batches) - warmup) * batch_size / (time.perf_counter() - start)


def torch_throughput(images, labels, depth, width, warmup) -> float:
    import torch
    from torch import nn

    torch.set_num_threads(2)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))

    blocks = (depth - 2) // 6
    layers = [nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    cin = width
    for stage in range(3):
        for index in range(blocks):
            cout = width * 2**stage
            layers.append(Block(cin, cout, 2 if stage > 0 and index == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    model = nn.Sequential(*layers).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    loss_fn = nn.CrossEntropyLoss()
    xs = [
        (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous(
            memory_format=torch.channels_last
        )
        for x in images
    ]
    ys = [torch.from_numpy(y).long() for y in labels]

    def one(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    for x, y in list(zip(xs, ys))[:warmup]:
        one(x, y)
    start = time.perf_counter()
    for x, y in list(zip(xs, ys))[warmup:]:
        one(x, y)
    return (len(xs) - warmup) * images.shape[1] / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    images, labels = load_batches(args.data_dir, args.batch, args.steps)
    jax_ips = jax_throughput(images, labels, args.depth, args.width, args.warmup)
    torch_ips = torch_throughput(images, labels, args.depth, args.width, args.warmup)
    print(f"ResNet-{args.depth} width {args.width}, batch {args.batch}, 28x28x1, CPU")
    print(f"jaxclean train_step: {jax_ips:8.1f} images/s")
    print(f"PyTorch eager      : {torch_ips:8.1f} images/s")
    print(f"ratio JAX/PyTorch  : {jax_ips / torch_ips:8.2f}x")


if __name__ == "__main__":
    main()
