"""Smoke test of bench/tile_skipping.py: its tile counting on a hand-made block and its emulated skipping."""

from __future__ import annotations

import pytest
import torch

from bench import tile_skipping as ts
from marginops import reference
from marginops.margins import ArcFace, CosFace


def hand_block():
    """4 rows x 7 classes, tiles of 2 x 3: row tiles {0,1}, {2,3}; column tiles {0-2}, {3-5}, {6} (ragged)."""
    block = torch.zeros(4, 7, dtype=torch.float64)
    g = torch.tensor([1.0, 1.0, 0.5, -2.0], dtype=torch.float64)
    block[1, 4] = 0.2  # >= 0.1 * |1|: keeps tile (0, 1)
    block[2, 0] = 0.04  # < 0.1 * |0.5| = 0.05: tile (1, 0) still skippable
    block[3, 6] = 0.2  # = 0.1 * |-2|, not below: keeps the one-column tile (1, 2)
    return block, g


def test_tile_counts_on_a_hand_made_block():
    block, g = hand_block()
    tiles = ts.skippable_tiles(block, g, 0.1, 2, 3)
    assert tiles.tolist() == [[True, False, True], [True, True, False]]
    entries = ts.skipped_entries(block, g, 0.1, 2, 3)
    assert entries.shape == block.shape
    assert int(entries.sum()) == 6 + 2 + 6 + 6  # tiles (0,0), (0,2) (2 x 1), (1,0), (1,1)
    assert not entries[1, 4] and not entries[3, 6] and entries[2, 0]
    # one block over everything (the CPU backend's B x chunk): the two entries above keep it
    assert ts.skippable_tiles(block, g, 0.1, 4, 7).tolist() == [[False]]
    # 0.25 puts 0.2 below 0.25 * |1| (row 1) and 0.2 below 0.25 * |-2| (row 3): every tile goes
    assert ts.skippable_tiles(block, g, 0.25, 2, 3).all()
    # 1 x 1 tiles: everything except the two entries at or above the threshold
    assert int(ts.skippable_tiles(block, g, 0.1, 1, 1).sum()) == 4 * 7 - 2


def test_choose_chunk_matches_the_cpu_formula():
    # 2 MiB / (256 rows * 4 bytes) = 2048 columns, capped at ceil(2000 / 16) = 125, rounded up to 16
    assert ts.choose_chunk(256, 1, 2000, 4) == 128
    assert ts.choose_chunk(512, 1, 10**6, 4) == 1024  # 2 MiB / (512 * 4)
    assert ts.choose_chunk(8, 1, 10**6, 8) == 8192  # the 8192 cap
    assert ts.choose_chunk(4, 1, 40, 4) == 40  # never wider than the head


def problem(dtype, classes=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(70, 16, generator=g, dtype=dtype)
    w = torch.randn(classes, 16, generator=g, dtype=dtype)
    labels = torch.randint(0, classes, (70,), generator=g)
    return x, w, labels


def grads(loss_fn, x, w):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = loss_fn(x, w)
    loss.backward()
    return loss.detach(), x.grad, w.grad.to_dense()


@pytest.mark.parametrize("margin", [ArcFace(s=64.0, m=0.5), CosFace(s=64.0, m=0.35)], ids=["arcface", "cosface"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tau_zero_is_the_reference_bit_for_bit(margin, dtype):
    x, w, labels = problem(dtype)
    want = grads(lambda a, b: reference.margin_cross_entropy(a, b, labels, margin), x, w)
    got = grads(lambda a, b: ts.emulated_loss(a, b, labels, margin, 0.0, 64, 64), x, w)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_tau_one_zeroes_every_non_target_entry():
    # with s = 1, s·|dφ|·p < 1 for every entry, so every non-target entry lies below 1·|g_i|
    margin = ArcFace(s=1.0, m=0.5)
    x, w, labels = problem(torch.float64)
    logits, factor, target, _ = ts.margined_logits(x, w, labels, margin)
    z = logits.detach().clone().requires_grad_()
    g = torch.linspace(0.5, 2.0, z.shape[0], dtype=z.dtype)
    lse = ts.SkipTilesLSE.apply(z, factor, target, 1.0, 64, 64)
    (lse * g).sum().backward()
    assert torch.count_nonzero(z.grad[~target]) == 0
    want = g * torch.exp(z.detach()[target] - lse.detach())
    torch.testing.assert_close(z.grad[target], want, rtol=1e-12, atol=0)
