"""Synthetic identity data generated on the fly (no downloads), and a small embedding network.

An identity is a random code in a low-dimensional latent space; one "image" of it is a fixed random
non-linear rendering of that code together with a per-sample nuisance code (pose, light...), plus
noise.  The renderer is the same for every identity, so a network that learns to read the identity
and ignore the nuisance generalizes to identities it never saw: the open-set setting of face
recognition, in miniature.  Everything is drawn from seeded torch Generators, so two trainings with
the same seed see exactly the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class IdentityWorld:
    latent_dim: int = 16
    nuisance_dim: int = 16
    input_dim: int = 128
    hidden: int = 192
    nuisance_scale: float = 2.0  # the nuisance moves a sample as much as the identity does: invariance must be learnt
    noise: float = 0.1
    seed: int = 1234

    def renderer(self) -> "Renderer":
        return Renderer(self)


class Renderer:
    """x = tanh(A·[identity, nuisance] + a)·B + noise, A and B fixed by the world's seed."""

    def __init__(self, world: IdentityWorld):
        g = torch.Generator().manual_seed(world.seed)
        self.world = world
        self.a_w = (
            torch.randn(world.latent_dim + world.nuisance_dim, world.hidden, generator=g)
            / (world.latent_dim + world.nuisance_dim) ** 0.5
        )
        self.a_b = 0.1 * torch.randn(world.hidden, generator=g)
        self.b_w = torch.randn(world.hidden, world.input_dim, generator=g) / world.hidden**0.5

    def identities(self, n: int, seed: int) -> torch.Tensor:
        """n identity codes (n, latent_dim); different seeds give disjoint (unseen) identities."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, self.world.latent_dim, generator=g)

    def render(self, codes: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        w = self.world
        nuisance = w.nuisance_scale * torch.randn(labels.shape[0], w.nuisance_dim, generator=g)
        hidden = torch.tanh(torch.cat([codes[labels], nuisance], dim=1) @ self.a_w + self.a_b)
        x = hidden @ self.b_w
        return x + w.noise * torch.randn(x.shape, generator=g)

    def batches(self, codes: torch.Tensor, batch: int, steps: int, seed: int):
        """`steps` batches (x, labels) of identities drawn uniformly, fresh nuisance and noise each time."""
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            labels = torch.randint(0, codes.shape[0], (batch,), generator=g)
            yield self.render(codes, labels, g), labels

    def gallery(self, codes: torch.Tensor, per_identity: int, seed: int):
        """per_identity samples of every identity: (x, labels) sorted by identity."""
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(codes.shape[0]).repeat_interleave(per_identity)
        return self.render(codes, labels, g), labels


def embedding_net(input_dim: int, embedding_size: int, width: int = 256) -> nn.Module:
    """A small backbone with the face-recognition habit of a BatchNorm on the embedding."""
    return nn.Sequential(
        nn.Linear(input_dim, width),
        nn.BatchNorm1d(width),
        nn.PReLU(width),
        nn.Linear(width, width),
        nn.BatchNorm1d(width),
        nn.PReLU(width),
        nn.Linear(width, embedding_size),
        nn.BatchNorm1d(embedding_size),
    )
