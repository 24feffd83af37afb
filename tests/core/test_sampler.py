"""Sampler: greedy rows, reproducible seeded draws independent of batch-mates, top-k / top-p filters."""

import torch

from engine.core.sampler import Sampler, SamplingMetadata, gumbel


def params(rows):
    return SamplingMetadata.build(rows, "cpu")


def test_gumbel_noise_is_deterministic_and_well_formed():
    seeds = torch.tensor([1, 2, (1 << 62) + 1], dtype=torch.int64)
    g = gumbel(seeds, torch.zeros_like(seeds), 50_000)
    assert torch.equal(g, gumbel(seeds, torch.zeros_like(seeds), 50_000))
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.02 and abs(g.std().item() - 1.2825) < 0.02  # Gumbel(0, 1)
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])
    assert not torch.equal(g, gumbel(seeds, torch.ones_like(seeds), 50_000))


def test_greedy_rows_take_argmax():
    logits = torch.randn(3, 50)
    out = Sampler()(logits, params([(0.0, 1.0, 0, 1)] * 3), torch.zeros(3, dtype=torch.int64))
    assert torch.equal(out, logits.argmax(-1))


def test_a_row_does_not_depend_on_its_batch_mates():
    torch.manual_seed(0)
    row = torch.randn(1, 1000)
    others = torch.randn(5, 1000)
    setting = (0.9, 0.95, 50, 1234)
    alone = Sampler()(row, params([setting]), torch.tensor([7]))
    mixed_rows = [(0.0, 1.0, 0, 1), setting, (1.3, 1.0, 0, 99), (0.5, 0.5, 3, 2), (1.0, 1.0, 10, 5), (2.0, 1.0, 0, 6)]
    batch = torch.cat([others[:1], row, others[1:]])
    mixed = Sampler()(batch, params(mixed_rows), torch.full((6,), 7))
    assert mixed[1] == alone[0]


def test_draws_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    counts = torch.zeros(4)
    for step in range(3000):
        counts[Sampler()(logits, params([(1.0, 1.0, 0, 42)]), torch.tensor([step]))] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2, 0.0]), atol=0.03)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2, 1)
    picked_k, picked_p = set(), set()
    for step in range(400):
        steps = torch.tensor([step, step])
        picked_k.add(int(Sampler()(logits[:1], params([(1.0, 1.0, 2, 3)]), steps[:1])))
        picked_p.add(int(Sampler()(logits[:1], params([(1.0, 0.75, 0, 3)]), steps[:1])))
    assert picked_k == {0, 1}
    assert picked_p == {0, 1, 2}  # 0.4 + 0.3 < 0.75, so the third token is still inside the nucleus


def test_bfloat16_logits_sample_as_their_float32_widening():
    """The decode graph hands over logits in the model's dtype; widening is exact, so every row's pick is the same."""
    torch.manual_seed(1)
    logits = (torch.randn(6, 3000) * 4).bfloat16()
    rows = [(0.0, 1.0, 0, 1), (0.7, 1.0, 0, 2), (1.3, 1.0, 0, 3), (0.9, 0.9, 0, 4), (1.0, 1.0, 20, 5), (0.5, 0.8, 7, 6)]
    for step in range(5):
        steps = torch.full((6,), step)
        assert torch.equal(Sampler()(logits, params(rows), steps), Sampler()(logits.float(), params(rows), steps))
