import math

import pytest
import torch

from dpolab.engine.losses import dpo_loss


def _t(*values):
    return torch.tensor(values, dtype=torch.float64)


# One pair: policy chosen -10, rejected -12; reference chosen -11, rejected -11 => h = (1) - (-1) = 2.
ARGS = (_t(-10.0), _t(-12.0), _t(-11.0), _t(-11.0))


def test_sigmoid_hand_computed():
    losses, chosen_r, rejected_r = dpo_loss(*ARGS, beta=0.1)
    assert losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.2))), abs=1e-12)  # 0.598139
    assert losses.item() == pytest.approx(0.5981388693, abs=1e-9)
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == pytest.approx(-0.1)


def test_sigmoid_at_zero_margin_is_ln2():
    losses, _, _ = dpo_loss(_t(-5.0), _t(-7.0), _t(-5.0), _t(-7.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(2))


def test_hinge_hand_computed():
    assert dpo_loss(*ARGS, beta=0.1, loss_type="hinge")[0].item() == pytest.approx(0.8)  # max(0, 1 - 0.2)
    assert dpo_loss(*ARGS, beta=1.0, loss_type="hinge")[0].item() == 0.0  # max(0, 1 - 2)


def test_ipo_hand_computed_per_token():
    # chosen 4 tokens, rejected 2: h = 1/4 - (-1)/2 = 0.75; target 1/(2·0.5) = 1 => (0.75 - 1)^2 = 0.0625
    losses, _, _ = dpo_loss(*ARGS, beta=0.5, loss_type="ipo", chosen_tokens=_t(4.0), rejected_tokens=_t(2.0))
    assert losses.item() == pytest.approx(0.0625)
    with pytest.raises(ValueError, match="token counts"):
        dpo_loss(*ARGS, beta=0.5, loss_type="ipo")


def test_robust_hand_computed_and_reduces_to_dpo():
    eps = 0.2
    z = 0.2  # beta·h
    expected = (-(1 - eps) * math.log(1 / (1 + math.exp(-z))) + eps * math.log(1 / (1 + math.exp(z)))) / (1 - 2 * eps)
    assert dpo_loss(*ARGS, beta=0.1, loss_type="robust", label_smoothing=eps)[0].item() == pytest.approx(expected)
    assert dpo_loss(*ARGS, beta=0.1, loss_type="robust")[0].item() == pytest.approx(dpo_loss(*ARGS, beta=0.1)[0].item())


def test_batched_shapes_and_unknown_type():
    losses, c, r = dpo_loss(_t(-1, -2, -3), _t(-2, -2, -1), _t(-1, -1, -1), _t(-1, -1, -1), beta=0.1)
    assert losses.shape == c.shape == r.shape == (3,)
    assert losses[1].item() == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(*ARGS, beta=0.1, loss_type="kto")


# ------------------------------------------------------------------------- every TRL 1.16 loss type, by hand
def _ls(z):  # −log σ(z)
    return math.log1p(math.exp(-z))


def _sig(z):
    return 1 / (1 + math.exp(-z))


@pytest.mark.parametrize("loss_type,kwargs,expected", [
    # ARGS: chosen log-ratio +1, rejected −1, h = 2, β = 0.1.
    ("nca_pair", {}, _ls(0.1) + 0.5 * _ls(-0.1) + 0.5 * _ls(0.1)),
    ("bco_pair", {}, 2 * _ls(0.1)),
    ("sppo_hard", {}, (1 - 5) ** 2 + (-1 + 5) ** 2),  # (r_w − 1/(2β))² + (r_l + 1/(2β))² = 32
    ("aot", {}, _ls(0.2)),  # one pair: policy log-ratio 2 vs reference 0
    ("aot_unpaired", {}, _ls(0.2)),
    ("apo_zero", {}, 1 - _sig(0.1) + _sig(-0.1)),
    ("apo_down", {}, _sig(0.1) + 1 - _sig(0.2)),
    ("discopop", {"discopop_tau": 0.05}, _ls(0.2) * (1 - _sig(4.0)) + math.exp(-0.2) * _sig(4.0)),
    ("sft", {"chosen_nll": torch.tensor(2.5, dtype=torch.float64)}, 2.5),
    ("sigmoid_norm", {"chosen_tokens": _t(4.0), "rejected_tokens": _t(2.0)}, _ls(0.1 * (0.25 + 0.5))),
    ("exo_pair", {"label_smoothing": 1e-3},
     _sig(0.2) * (-_ls(0.2) - math.log(1 - 1e-3)) + _sig(-0.2) * (-_ls(-0.2) - math.log(1e-3))),
])
def test_every_dpo_loss_type_by_hand(loss_type, kwargs, expected):
    losses, chosen_r, rejected_r = dpo_loss(*ARGS, beta=0.1, loss_type=loss_type, **kwargs)
    assert losses.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == pytest.approx(-0.1)


def test_loss_weights_combine_as_the_weighted_sum_of_means():
    nll = torch.tensor(2.5, dtype=torch.float64)
    mpo, _, _ = dpo_loss(*ARGS, beta=0.1, loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0],
                         chosen_nll=nll)
    assert mpo.item() == pytest.approx(0.8 * _ls(0.2) + 0.2 * 2 * _ls(0.1) + 2.5)
    with pytest.raises(ValueError, match="2 loss_weights for 1 loss types"):
        dpo_loss(*ARGS, beta=0.1, loss_weights=[1.0, 1.0])


def test_aot_sorts_across_the_batch():
    # policy log-ratios (chosen − rejected) 3 and −1, reference 0 and 2: sorted deltas (−1 − 0, 3 − 2) = (−1, 1).
    losses, _, _ = dpo_loss(_t(-1.0, -4.0), _t(-4.0, -3.0), _t(-2.0, -1.0), _t(-2.0, -3.0), beta=1.0, loss_type="aot")
    assert losses.tolist() == pytest.approx([_ls(-1.0), _ls(1.0)])


# ------------------------------------------------------------------------- reference-free and unpaired
def test_simpo_by_hand():
    from dpolab.engine.losses import simpo_loss

    losses, chosen_r, rejected_r = simpo_loss(_t(-2.0), _t(-3.0), beta=2.0, gamma=0.5)
    assert losses.item() == pytest.approx(_ls(2.0 * 1.0 - 0.5))  # −log σ(β·Δavg − γ)
    assert (chosen_r.item(), rejected_r.item()) == (-4.0, -6.0)


def test_alphapo_by_hand():
    import math

    from dpolab.engine.losses import alphapo_reward, simpo_loss

    # r = (1 − π̄^(−α))/α: avg log-probs −2 and −3, α = 0.5 → (1 − e^1)/0.5 and (1 − e^1.5)/0.5
    r_w, r_l = (1 - math.e) / 0.5, (1 - math.exp(1.5)) / 0.5
    assert alphapo_reward(_t(-2.0), 0.5).item() == pytest.approx(r_w)
    losses, chosen_r, rejected_r = simpo_loss(_t(-2.0), _t(-3.0), beta=2.0, gamma=0.5, alpha=0.5)
    assert losses.item() == pytest.approx(_ls(2.0 * (r_w - r_l) - 0.5))
    assert (chosen_r.item(), rejected_r.item()) == pytest.approx((2.0 * r_w, 2.0 * r_l))
    assert alphapo_reward(_t(-2.0), 1e-6).item() == pytest.approx(-2.0, rel=1e-5)  # α → 0: SimPO's avg log π


def test_cpo_by_hand():
    from dpolab.engine.losses import cpo_loss

    losses, chosen_r, rejected_r = cpo_loss(_t(-10.0), _t(-12.0), beta=0.1)
    assert losses.item() == pytest.approx(_ls(0.2))
    assert chosen_r.item() == pytest.approx(-1.0) and rejected_r.item() == pytest.approx(-1.2)


def test_orpo_by_hand_and_log1mexp():
    from dpolab.engine.losses import log1mexp, orpo_loss

    for x in (-1e-6, -1e-3, -0.5, -5.0, -40.0):
        assert log1mexp(_t(x)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)
    c, r = -0.5, -1.0
    log_odds = (c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r)))
    losses, chosen_r, _ = orpo_loss(_t(c), _t(r), beta=0.1)
    assert losses.item() == pytest.approx(0.1 * _ls(log_odds))
    assert chosen_r.item() == pytest.approx(-0.05)


def test_kto_by_hand():
    from dpolab.engine.losses import kto_kl, kto_loss

    assert kto_kl(_t(-3.0, -5.0), _t(-4.0, -4.5)).item() == pytest.approx(0.25)  # mean(1, −0.5)
    losses, rewards = kto_loss(_t(-5.0, -6.0), _t(-5.5, -5.5), torch.tensor(0.2, dtype=torch.float64),
                               torch.tensor([True, False]), beta=0.1, desirable_weight=1.5, undesirable_weight=0.5)
    assert losses.tolist() == pytest.approx([1.5 * (1 - _sig(0.1 * (0.5 - 0.2))), 0.5 * (1 - _sig(0.1 * (0.2 + 0.5)))])
    assert rewards.tolist() == pytest.approx([0.05, -0.05])


def test_reward_loss_by_hand():
    from dpolab.engine.losses import reward_loss

    chosen, rejected = _t(1.5, -0.5), _t(0.5, 0.5)  # differences 1 and -1
    # −log σ(1) = log(1 + e^−1) = 0.3132616875; −log σ(−1) = log(1 + e) = 1.3132616875
    assert reward_loss(chosen, rejected).tolist() == pytest.approx([0.3132616875, 1.3132616875], abs=1e-9)
    # margin 0.5 and 0: −log σ(1 − 0.5) = log(1 + e^−0.5) = 0.4740769842
    with_margin = reward_loss(chosen, rejected, margin=_t(0.5, 0.0))
    assert with_margin.tolist() == pytest.approx([0.4740769842, 1.3132616875], abs=1e-9)
    # centring, c = 0.01: + 0.01·(1.5 + 0.5)² = 0.04 and + 0.01·(−0.5 + 0.5)² = 0
    centred = reward_loss(chosen, rejected, center_rewards_coefficient=0.01)
    assert centred.tolist() == pytest.approx([0.3532616875, 1.3132616875], abs=1e-9)
    both = reward_loss(chosen, rejected, _t(0.5, 0.0), 0.01)
    assert both.tolist() == pytest.approx([0.5140769842, 1.3132616875], abs=1e-9)
    # equal scores: ln 2 whatever the offset (without centring the pair's offset is free)
    assert reward_loss(_t(7.0), _t(7.0)).item() == pytest.approx(math.log(2))
