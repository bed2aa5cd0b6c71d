import numpy as np
import pytest

from lossx.errors import DataError, SpecError
from lossx.runtime.feeds import check_labels
from lossx.runtime.loss_specs import LOSSES, make_loss_spec, parse_loss_spec


def test_a_bare_name_takes_torch_defaults():
    spec = parse_loss_spec("ce")
    assert dict(spec.options) == {
        "weight": None,
        "ignore_index": -100,
        "label_smoothing": 0.0,
        "reduction": "mean",
        "target": "index",
    }
    assert str(spec) == "ce"


def test_options_are_read_and_written_back():
    spec = parse_loss_spec(" ce( label_smoothing=0.1, reduction=sum, weight=[1, 2.5, -0], ) ")
    assert spec["label_smoothing"] == 0.1
    assert spec["reduction"] == "sum"
    assert spec["weight"] == (1.0, 2.5, 0.0)
    assert str(spec) == "ce(weight=[1, 2.5, 0], label_smoothing=0.1, reduction=sum)"
    assert parse_loss_spec(str(spec)) == spec


@pytest.mark.parametrize("name", list(LOSSES))
def test_every_loss_round_trips_through_its_dict(name):
    spec = make_loss_spec(name)
    assert type(spec).from_dict(spec.to_dict()) == spec


def test_booleans_negatives_and_none():
    assert parse_loss_spec("kl_div(log_target=true)")["log_target"] is True
    assert parse_loss_spec("nll(ignore_index=-1)")["ignore_index"] == -1
    assert parse_loss_spec("bce_logits(weight=none, reduction=none)")["weight"] is None
    assert parse_loss_spec("bce_logits(reduction='none')")["reduction"] == "none"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("focal", r"unknown loss 'focal'; known losses: ce, nll, mse, l1, smooth_l1, huber, "),
        ("ce(smoothing=0.1)", r"ce: unknown option 'smoothing'; ce takes weight, ignore_index, "),
        ("ce(label_smoothing=1.5)", r"label_smoothing=1.5 is out of range; expected >= 0 and <= 1"),
        ("ce(label_smoothing=-0.1)", r"label_smoothing=-0.1 is out of range"),
        ("huber(delta=0)", r"huber: option delta=0 is out of range; expected > 0"),
        ("smooth_l1(beta=-1)", r"beta=-1 is out of range; expected >= 0"),
        ("ce(reduction=avg)", r"reduction='avg' is not one of none, mean, sum"),
        ("mse(reduction=batchmean)", r"is not one of none, mean, sum"),
        ("ce(ignore_index=1.5)", r"ignore_index=1.5 must be an integer"),
        ("ce(weight=[1, nan])", r"must hold numbers only"),
        ("ce(weight=[])", r"must be a non-empty list of numbers"),
        ("ce(weight=[1, x])", r"must hold numbers only"),
        ("ce(label_smoothing=true)", r"must be a number"),
        ("kl_div(log_target=1)", r"must be true or false"),
        ("ce(target=probs, ignore_index=3)", r"ignore_index applies to class-index targets only"),
        ("bce_logits(weight=[1, 2], pos_weight=[1, 2, 3])", r"must have the same length"),
        ("ce(label_smoothing=0.1", r"cannot read loss spec"),
        ("ce(0.1)", r"write name\(option=value, ...\)"),
        ("ce(reduction=sum, reduction=mean)", r"each option must be given once"),
        ("ce(weight=__import__('os'))", r"cannot read the value"),
        ("", r"cannot read loss spec"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(text, message):
    with pytest.raises(SpecError, match=message):
        parse_loss_spec(text)


def test_labels_outside_the_classes_are_refused_before_running():
    spec = parse_loss_spec("ce")
    check_labels(spec, np.array([0, 9, -100]), classes=10)
    with pytest.raises(
        DataError, match=r"labels: value 10 at index \[1\] is not a class index 0..9"
    ):
        check_labels(spec, np.array([0, 10]), classes=10)
    with pytest.raises(DataError, match=r"value -1 at index \[0, 1\] .* nor ignore_index -100"):
        check_labels(spec, np.array([[0, -1]]), classes=10)
    with pytest.raises(DataError, match=r"expected int64 class indices, got int32"):
        check_labels(spec, np.array([0], dtype=np.int32), classes=10)
    check_labels(parse_loss_spec("nll(ignore_index=-1)"), np.array([-1, 3]), classes=10)
