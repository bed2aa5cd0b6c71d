import pytest

from lossx.build.losses import parse_losses
from lossx.errors import SpecError


def test_parse_losses_keeps_order():
    assert parse_losses("l1, ce,mse") == ["l1", "ce", "mse"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ce,hinge", "unknown loss 'hinge'; known losses: ce, mse, l1"),
        ("ce,ce", "loss listed twice"),
        (" , ", "no losses given"),
    ],
)
def test_bad_loss_lists_are_refused(text, message):
    with pytest.raises(SpecError, match=message):
        parse_losses(text)
