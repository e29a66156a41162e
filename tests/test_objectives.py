"""The preference and RL losses against numbers computed by hand on tiny tensors."""

import math

import pytest
import torch

from lmstack.train.objectives import (bradley_terry_loss, dpo_loss, gae, group_advantages, kl_estimates,
                                      ppo_clip_loss, value_loss)


def t(*x):
    return torch.tensor(x, dtype=torch.float64)


def test_bradley_terry():
    # -log sigmoid(2 - 0) = log(1 + e^-2)
    assert bradley_terry_loss(t(2.0), t(0.0)).item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert bradley_terry_loss(t(0.0), t(0.0)).item() == pytest.approx(math.log(2))
    r = t(1.0).requires_grad_()
    bradley_terry_loss(r, t(0.0)).backward()
    assert r.grad.item() == pytest.approx(-(1 - 1 / (1 + math.exp(-1))))  # -(1 - sigmoid(1))


def test_dpo():
    loss, chosen, rejected = dpo_loss(t(-1.0), t(-3.0), t(-2.0), t(-2.0), beta=0.5)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    # Policy == reference: rewards 0, loss log 2.
    loss, c, r = dpo_loss(t(-1.0), t(-3.0), t(-1.0), t(-3.0))
    assert loss.item() == pytest.approx(math.log(2)) and c.item() == 0 == r.item()


def test_kl_estimators():
    k = kl_estimates(t(math.log(0.5)), t(math.log(0.25)))
    assert k["k1"].item() == pytest.approx(math.log(2))
    assert k["k2"].item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert k["k3"].item() == pytest.approx(0.5 - 1 + math.log(2))
    # Averaged over samples of p, k1 and k3 estimate KL(p || q) (exactly, in expectation).
    p, q = t(0.7, 0.3), t(0.4, 0.6)
    kl = (p * (p / q).log()).sum().item()
    for name in ("k1", "k3"):
        assert (p * kl_estimates(p.log(), q.log())[name]).sum().item() == pytest.approx(kl)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [1.0, 1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # row 0: A2 = 1 - 0.7 = 0.3; A1 = (0.7 - 0.6) + 0.5 * 0.3 = 0.25; A0 = (0.6 - 0.5) + 0.5 * 0.25 = 0.225
    # row 1 (last token masked): A1 = 2 - 1 = 1; A0 = (0 + 1 - 1) + 0.5 * 1 = 0.5
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3], [0.5, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0], [1.5, 2.0, 0.0]], dtype=torch.float64))
    # gamma = lam = 1 with values 0: every token's advantage is the sum of the rewards after it.
    adv, _ = gae(rewards, torch.zeros_like(values), torch.ones(2, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]], dtype=torch.float64))


def test_ppo_clip_by_hand():
    logp = torch.log(t(1.5, 1.5, 0.5, 0.5))  # old log-probs 0: ratios 1.5, 1.5, 0.5, 0.5
    adv = t(1.0, -1.0, 1.0, -1.0)
    loss, clipped = ppo_clip_loss(logp, torch.zeros(4, dtype=torch.float64), adv, clip=0.2)
    torch.testing.assert_close(loss, t(-1.2, 1.5, -0.5, 0.8))
    torch.testing.assert_close(clipped, t(1.0, 0.0, 0.0, 1.0))
    # Clipped tokens pass no gradient.
    lp = logp.clone().requires_grad_()
    ppo_clip_loss(lp, torch.zeros(4, dtype=torch.float64), adv)[0].sum().backward()
    assert lp.grad[0] == 0 and lp.grad[3] == 0 and lp.grad[1] != 0 and lp.grad[2] != 0


def test_value_loss_by_hand():
    # V 1.0 (old 0.5, clipped to 0.7), return 2: 0.5 * max(1, 1.69)
    assert value_loss(t(1.0), t(0.5), t(2.0), clip=0.2).item() == pytest.approx(0.845)
    assert value_loss(t(0.6), t(0.5), t(2.0), clip=0.2).item() == pytest.approx(0.5 * 1.4 ** 2)


def test_group_advantages_by_hand():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    g = group_advantages(r, "grpo")
    torch.testing.assert_close(g[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    assert torch.equal(g[1], torch.zeros(4))  # all equal: nothing to learn
    std = math.sqrt(0.5)  # of [3, 1, 2, 2] (population)
    torch.testing.assert_close(g[2], torch.tensor([1 / std, -1 / std, 0.0, 0.0]), atol=1e-5, rtol=0)
    rl = group_advantages(r, "rloo")
    torch.testing.assert_close(rl[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))  # 1 - 1/3, 0 - 2/3
    torch.testing.assert_close(rl[2], torch.tensor([3 - 5 / 3, 1 - 7 / 3, 0.0, 0.0]))
    with pytest.raises(ValueError):
        group_advantages(r, "ppo")
