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
