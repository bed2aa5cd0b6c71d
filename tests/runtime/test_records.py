"""The fact tables (losses, precisions, graph kinds, tensor roles and values) are the one source
of what the manifest schema enumerates, and every table is complete where code dispatches
through it."""

import json
from importlib import resources

from lossx.compare.tolerances import PROFILES
from lossx.runtime.graphs import KINDS, VALUES, GraphKind, Role
from lossx.runtime.loss_specs import EVAL_AGGREGATES, EVAL_INPUTS, EVAL_TARGETS, LOSSES
from lossx.runtime.precisions import PRECISIONS

SCHEMA = json.loads(
    resources.files("lossx.runtime").joinpath("manifest.schema.json").read_text(encoding="utf-8")
)


def test_the_schema_enumerates_exactly_the_tables():
    definitions = SCHEMA["definitions"]
    assert definitions["loss"]["properties"]["name"]["enum"] == list(LOSSES)
    assert definitions["graph"]["properties"]["kind"]["enum"] == list(GraphKind)
    assert definitions["tensor"]["properties"]["role"]["enum"] == list(Role)
    assert definitions["tensor"]["properties"]["values"]["enum"] == list(VALUES)
    precision = SCHEMA["properties"]["precision"]["properties"]["name"]["enum"]
    assert precision == list(PRECISIONS)


def test_every_graph_kind_has_a_record():
    assert KINDS.keys() == set(GraphKind)


def test_every_precision_names_a_profile_or_the_providers_fp32():
    for precision in PRECISIONS.values():
        assert precision.tolerance_profile is None or precision.tolerance_profile in PROFILES
        assert not (precision.calibrated and not precision.converted)
    assert [p.name for p in PRECISIONS.values() if p.tolerance_profile is None] == ["fp32"]


def test_every_loss_is_described_in_words_for_eval():
    for info in LOSSES.values():
        defaults = {o.name: o.default for o in info.options}
        assert info.eval_input in EVAL_INPUTS
        assert info.target_values(defaults) in EVAL_TARGETS
        assert info.target_values(defaults) in VALUES
        reductions = next(o.choices for o in info.options if o.name == "reduction")
        assert set(reductions) <= EVAL_AGGREGATES.keys()
