"""The renderers of a ParityReport: strict JSON against its schema, text, JUnit XML, Markdown."""

import copy
import dataclasses
import json
import math
import xml.etree.ElementTree as ET

import jsonschema
import pytest

from lossx.compare.render import schema, to_json, to_junit_xml, to_markdown, to_text
from lossx.compare.report import (
    HISTOGRAM_BINS,
    LayerRow,
    NonFinite,
    OutputReport,
    ParityReport,
    WorstElement,
)
from lossx.compare.tolerances import Tolerance

SHA_MODEL = "a" * 64
SHA_LOSS = "0123456789abcdef" * 4
INPUTS = ["test images 0-255", "test images 256-511", "random N=7 seed 2"]


def _fingerprint() -> dict:
    return {
        "lossx": "0.1.0",
        "torch": "2.9.0",
        "onnx": "1.19.0",
        "onnxruntime": "1.23.1",
        "providers": ["cpu"],
        "opset": 18,
        "ir_versions": {"model.onnx": 10, "loss_ce.onnx": 10},
        "graphs": {"model.onnx": SHA_MODEL, "loss_ce.onnx": SHA_LOSS},
    }


def _output(graph: str, output: str, **overrides) -> OutputReport:
    fields = dict(
        graph=graph,
        output=output,
        tolerance=Tolerance(1e-5, 1e-4, min_argmax_agreement=0.999, max_accuracy_drop=0.001),
        elements=5120,
        mismatches=0,
        max_abs_error=2.4e-6,
        mean_abs_error=3.1e-7,
        p99_abs_error=1.9e-6,
        max_rel_error=4.2e-5,
        mean_rel_error=1.1e-6,
        p99_rel_error=8.0e-6,
        max_tolerance_used=0.21,
        worst=WorstElement("test images 0-255", [3, 7], 1.234567, 1.2345646, 2.4e-6, 0.21),
        nonfinite=NonFinite(),
        histogram={"0": 120, "1e-8": 800, "1e-7": 3200, "1e-6": 1000},
    )
    fields.update(overrides)
    return OutputReport(**fields)


@pytest.fixture
def passing() -> ParityReport:
    return ParityReport(
        artifact="artifacts/cifar10",
        reference="eager PyTorch (cpu, float32)",
        profile="fp32-cpu",
        inputs=INPUTS,
        outputs=[
            _output(
                "model.onnx",
                "logits",
                argmax_agreement=1.0,
                accuracy_onnx=0.9123,
                accuracy_reference=0.9123,
            ),
            _output("loss_ce.onnx", "loss", elements=3, histogram={"0": 2, "1e-8": 1}),
            _output("loss_ce.onnx", "grad", worst=None, max_tolerance_used=0.0),
        ],
        fingerprint=_fingerprint(),
        seconds=12.345,
    )


@pytest.fixture
def failing() -> ParityReport:
    nan, inf = float("nan"), float("inf")
    bad_logits = _output(
        "model.onnx",
        "logits",
        mismatches=12,
        max_abs_error=inf,
        mean_abs_error=nan,
        p99_abs_error=3.5e-3,
        max_rel_error=nan,
        max_tolerance_used=inf,
        worst=WorstElement("random N=7 seed 2", [5, 1], nan, 0.75, nan, inf),
        nonfinite=NonFinite(onnx_nan=3, onnx_inf=1, disagreeing=4),
        histogram={"0": 10, "1e-6": 5000, ">=1": 12},
        argmax_agreement=0.9984,
        accuracy_onnx=0.9101,
        accuracy_reference=0.9123,
        task_failures=["top-1 accuracy 91.01% is 0.22 pp below the reference's 91.23%"],
    )
    bad_loss = _output(
        "loss_ce.onnx",
        "loss",
        elements=3,
        mismatches=1,
        max_abs_error=0.5,
        max_tolerance_used=41.2,
        histogram={"1e-3": 1, "0": 2},
    )
    return ParityReport(
        artifact="artifacts/cifar10",
        reference="eager PyTorch (cpu, float32)",
        profile="fp32-cuda",
        inputs=INPUTS,
        outputs=[bad_logits, bad_loss, _output("loss_ce.onnx", "grad")],
        fingerprint={**_fingerprint(), "cuda": None},  # extra keys are allowed
        seconds=30.5,
        layers=[
            LayerRow("model1.0 (Conv2d)", "/model1/model1.0/Conv_output_0", 1e-6, 0.1),
            LayerRow("model1.3 (MaxPool2d)", "/model1/model1.3/MaxPool_output_0", nan, inf),
            LayerRow("model2 (Linear)", "logits", 3.5e-3, 350.0),
        ],
        first_failing_layer="model1.3 (MaxPool2d)",
        repro="artifacts/cifar10/check-failure.npz",
    )


def _strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


# --- JSON and its schema ------------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema():
    data = schema()
    jsonschema.Draft202012Validator.check_schema(data)
    assert data["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert data["$defs"]["histogram"]["propertyNames"]["enum"] == list(HISTOGRAM_BINS)


@pytest.mark.parametrize("which", ["passing", "failing"])
def test_json_is_strict_and_follows_the_schema(which, request):
    report = request.getfixturevalue(which)
    data = _strict_loads(to_json(report))
    jsonschema.Draft202012Validator(schema()).validate(data)
    assert data["passed"] is report.passed
    assert len(data["outputs"]) == len(report.outputs)


def test_json_writes_non_finite_numbers_as_strings(failing):
    data = _strict_loads(to_json(failing))
    logits = data["outputs"][0]
    assert logits["max_abs_error"] == "Infinity"
    assert logits["mean_abs_error"] == "NaN"
    assert logits["worst"]["onnx"] == "NaN"
    assert logits["worst"]["tolerance_used"] == "Infinity"
    assert logits["nonfinite"]["disagreeing"] == 4
    assert data["layers"][1]["max_abs_error"] == "NaN"
    assert data["layers"][1]["passed"] is False
    assert data["first_failing_layer"] == "model1.3 (MaxPool2d)"


def test_json_writes_negative_infinity():
    report = ParityReport(
        artifact="a",
        reference="r",
        profile="p",
        inputs=[],
        outputs=[_output("g", "o", worst=WorstElement("i", [0], -math.inf, 1.0, math.inf, 1e9))],
        fingerprint=_fingerprint(),
        seconds=0.0,
    )
    data = _strict_loads(to_json(report))
    assert data["outputs"][0]["worst"]["onnx"] == "-Infinity"
    jsonschema.Draft202012Validator(schema()).validate(data)


def _errors(data) -> list:
    return list(jsonschema.Draft202012Validator(schema()).iter_errors(data))


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda d: d.update(passed="yes"),
        lambda d: d.pop("fingerprint"),
        lambda d: d.update(unexpected=1),
        lambda d: d["outputs"][0].update(mismatches=1.5),
        lambda d: d["outputs"][0].update(max_abs_error="nan"),
        lambda d: d["outputs"][0].update(extra=True),
        lambda d: d["outputs"][0]["histogram"].update({"1e-13": 4}),
        lambda d: d["outputs"][0]["tolerance"].pop("rtol"),
        lambda d: d["outputs"][0]["tolerance"].update(min_argmax_agreement=2),
        lambda d: d["outputs"][0].update(task_failures="argmax"),
        lambda d: d["outputs"][0]["nonfinite"].update(onnx_nan=-1),
        lambda d: d["layers"][0].update(max_tolerance_used=None),
        lambda d: d["fingerprint"].pop("onnxruntime"),
        lambda d: d["fingerprint"]["graphs"].update({"model.onnx": "not-a-sha"}),
    ],
)
def test_schema_rejects_wrong_reports(failing, corrupt):
    data = _strict_loads(to_json(failing))
    assert not _errors(data)
    broken = copy.deepcopy(data)
    corrupt(broken)
    assert _errors(broken)


# --- JUnit XML ----------------------------------------------------------------------------------


def _suite(report: ParityReport) -> ET.Element:
    text = to_junit_xml(report)
    assert text.startswith("<?xml")
    root = ET.fromstring(text)
    assert root.tag == "testsuites"
    (suite,) = root.findall("testsuite")
    assert suite.get("name") == "lossx check"
    return suite


@pytest.mark.parametrize("which", ["passing", "failing"])
def test_junit_has_one_testcase_per_output(which, request):
    report = request.getfixturevalue(which)
    suite = _suite(report)
    cases = suite.findall("testcase")
    assert [(c.get("classname"), c.get("name")) for c in cases] == [
        (f"lossx.check.{o.graph}", o.output) for o in report.outputs
    ]
    assert suite.get("tests") == str(len(report.outputs))
    assert suite.get("failures") == str(len(report.failures))
    assert float(suite.get("time")) == pytest.approx(report.seconds, abs=1e-3)
    for case, o in zip(cases, report.outputs, strict=True):
        failures = case.findall("failure")
        if o.passed:
            assert failures == []
        else:
            (failure,) = failures
            message = failure.get("message")
            assert "\n" not in message
            assert "max abs error" in message
            assert f"{o.mismatches}/{o.elements}" in message
            assert "first failing layer: model1.3 (MaxPool2d)" in failure.text
            assert "histogram" in failure.text


def test_junit_failure_text_has_the_details(failing):
    cases = _suite(failing).findall("testcase")
    logits = cases[0].find("failure")
    assert "max abs error inf" in logits.get("message")
    assert "worst element: index [5, 1] of random N=7 seed 2: onnx NaN" in logits.text
    assert "4 disagreeing" in logits.text
    assert "check-failure.npz" in logits.text


def test_junit_properties_hold_the_fingerprint(failing):
    properties = {
        p.get("name"): p.get("value") for p in _suite(failing).find("properties").iter("property")
    }
    assert properties["onnxruntime"] == "1.23.1"
    assert properties["torch"] == "2.9.0"
    assert properties["providers"] == "cpu"
    assert properties["opset"] == "18"
    assert properties["graphs[model.onnx]"] == SHA_MODEL
    assert properties["graphs[loss_ce.onnx]"] == SHA_LOSS
    assert properties["ir_versions[model.onnx]"] == "10"
    assert properties["profile"] == "fp32-cuda"
    assert properties["reference"] == "eager PyTorch (cpu, float32)"


def test_task_level_failure_alone_fails_the_output(passing):
    logits = dataclasses.replace(
        passing.outputs[0],
        argmax_agreement=0.998,
        task_failures=["argmax agreement 99.800% < 99.900%"],
    )
    report = dataclasses.replace(passing, outputs=[logits, *passing.outputs[1:]])
    assert logits.mismatches == 0 and not report.passed
    jsonschema.Draft202012Validator(schema()).validate(_strict_loads(to_json(report)))
    suite = _suite(report)
    assert suite.get("failures") == "1"
    message = suite.find("testcase").find("failure").get("message")
    assert "max abs error" in message and "argmax agreement 99.800% < 99.900%" in message
    text = to_text(report)
    assert "FAILED" in text.splitlines()[0]
    assert "task-level check failed: argmax agreement 99.800%" in text
    assert to_markdown(report).startswith("## ❌ lossx check FAILED")


def test_junit_passing_report_has_no_failures(passing):
    suite = _suite(passing)
    assert suite.get("failures") == "0"
    assert suite.findall(".//failure") == []


# --- Markdown -----------------------------------------------------------------------------------


def _table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("| ")]


def test_markdown_failing(failing):
    text = to_markdown(failing)
    assert text.splitlines()[0] == "## ❌ lossx check FAILED"
    rows = _table_rows(text)
    for o in failing.outputs:
        assert sum(o.name in row for row in rows) == 1
    assert sum("❌ FAIL" in row for row in rows) == 2 + 2  # two outputs, two layers
    assert "**model.onnx/logits**" in text  # the failing outputs' worst elements
    assert "index [5, 1] of random N=7 seed 2" in text
    assert "model1.3 (MaxPool2d)" in text
    assert "check-failure.npz" in text
    assert "<details>" in text and "</details>" in text
    assert SHA_MODEL in text


def test_markdown_passing(passing):
    text = to_markdown(passing)
    assert text.splitlines()[0] == "## ✅ lossx check PASSED"
    rows = _table_rows(text)
    assert len(rows) == 2 + len(passing.outputs)  # header, alignment, one per output
    assert all(row.count("|") == rows[0].count("|") for row in rows)
    assert "100%" in rows[2]  # logits' argmax agreement
    assert "+0.00 pp" in rows[2]
    assert "❌" not in text
    assert "Layer by layer" not in text


def test_markdown_histogram_is_scaled_to_the_largest_bin(passing):
    text = to_markdown(passing)
    block = text.split("`model.onnx/logits` absolute error", 1)[1].split("```text\n", 1)[1]
    lines = block.split("\n```", 1)[0].splitlines()
    assert len(lines) == len(HISTOGRAM_BINS)
    bars = {line.split()[0]: line.count("#") for line in lines}
    assert bars["1e-7"] == 40  # the largest bin, 3200
    assert bars["1e-6"] == round(1000 / 3200 * 40)
    assert bars["1e-8"] == 10
    assert bars[">=1"] == 0


# --- console text -------------------------------------------------------------------------------


def test_text_failing(failing):
    text = to_text(failing)
    lines = text.splitlines()
    assert "FAILED" in lines[0]
    assert "artifacts/cifar10" in lines[0] and "fp32-cuda" in lines[0]
    rows = [line for line in lines if line.startswith(("model.onnx/", "loss_ce.onnx/"))]
    assert len(rows) == len(failing.outputs)
    assert [row.split()[-1] for row in rows] == ["FAIL", "FAIL", "ok"]
    assert "first failing layer: model1.3 (MaxPool2d)" in text
    assert "failing case saved to artifacts/cifar10/check-failure.npz" in text
    assert "/model1/model1.3/MaxPool_output_0" in text


def test_text_passing(passing):
    text = to_text(passing)
    lines = text.splitlines()
    assert "PASSED" in lines[0] and "3 input sets" in lines[0]
    rows = [line for line in lines if line.startswith(("model.onnx/", "loss_ce.onnx/"))]
    assert len(rows) == len(passing.outputs)
    assert len({len(row) for row in rows}) == 1  # aligned: verdict column ends together
    assert "21.0%" in rows[0]  # tolerance used
    assert "FAIL" not in text and "first failing layer" not in text
