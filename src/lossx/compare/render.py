"""A ParityReport as JSON, a console table, JUnit XML and Markdown: pure functions, stdlib only.

`to_json` writes strict JSON (NaN and +-Inf as the strings "NaN", "Infinity", "-Infinity");
`schema()` is the JSON Schema it follows, `parity_report.schema.json` beside this file.
"""

import json
import math
import re
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

from lossx.compare.report import HISTOGRAM_BINS, LayerRow, OutputReport, ParityReport
from lossx.files import write_atomically

SCHEMA_FILE = "parity_report.schema.json"
_BAR_WIDTH = 40
# Characters XML 1.0 cannot hold at all (ElementTree writes them as they are).
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


# --- JSON ---------------------------------------------------------------------------------------


def _strict(value):
    """`value` with every non-finite float replaced by "NaN", "Infinity" or "-Infinity"."""
    if isinstance(value, float) and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(item) for item in value]
    return value


def strict_json(value) -> str:
    """`value` as strict JSON, NaN and +-Inf written as strings."""
    return json.dumps(_strict(value), indent=2, allow_nan=False)


def to_json(report: ParityReport) -> str:
    """The JSON report: `report.to_dict()` as strict JSON (see `schema()`)."""
    return strict_json(report.to_dict())


def schema() -> dict:
    """The JSON Schema (draft 2020-12) that `to_json`'s output follows."""
    text = resources.files("lossx.compare").joinpath(SCHEMA_FILE).read_text(encoding="utf-8")
    return json.loads(text)


# --- shared formatting --------------------------------------------------------------------------


def _num(x: float | None) -> str:
    """A float in 3 significant digits; "NaN", "inf", "-inf" as such; "-" for None."""
    if x is None:
        return "-"
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.3g}"


def _pct(x: float | None) -> str:
    """A fraction as a percentage: "41.2%", "1.23e+04%" (way over), "NaN%"."""
    if x is None:
        return "-"
    if not math.isfinite(x):
        return f"{_num(x)}%"
    percent = x * 100
    return f"{percent:.1f}%" if abs(percent) < 1000 else f"{percent:.3g}%"


def _agreement(x: float | None) -> str:
    """Argmax agreement: exactly "100%" only when every row agrees."""
    if x is None:
        return "-"
    return "100%" if x == 1 else f"{x * 100:.3f}%"


def _accuracy_delta(o: OutputReport) -> str:
    """ONNX top-1 accuracy minus the reference's, in percentage points."""
    if o.accuracy_onnx is None or o.accuracy_reference is None:
        return "-"
    return f"{(o.accuracy_onnx - o.accuracy_reference) * 100:+.2f} pp"


def _has_task_columns(report: ParityReport) -> bool:
    return any(
        o.argmax_agreement is not None or o.accuracy_onnx is not None for o in report.outputs
    )


def _output_table(report: ParityReport, verdicts: tuple[str, str]) -> tuple[list[str], list[list]]:
    """The outputs table shared by text and Markdown: header and one row per output."""
    header = ["output", "atol", "rtol", "max abs", "p99 abs", "max rel", "tol used", "mismatches"]
    task = _has_task_columns(report)
    if task:
        header += ["argmax agree", "acc delta"]
    header.append("verdict")
    rows = []
    for o in report.outputs:
        row = [
            o.name,
            _num(o.tolerance.atol),
            _num(o.tolerance.rtol),
            _num(o.max_abs_error),
            _num(o.p99_abs_error),
            _num(o.max_rel_error),
            _pct(o.max_tolerance_used),
            f"{o.mismatches}/{o.elements}",
        ]
        if task:
            row += [_agreement(o.argmax_agreement), _accuracy_delta(o)]
        row.append(verdicts[0] if o.passed else verdicts[1])
        rows.append(row)
    return header, rows


def _layer_table(layers: list[LayerRow], verdicts: tuple[str, str]) -> tuple[list[str], list[list]]:
    header = ["layer", "onnx value", "max abs", "tol used", "verdict"]
    rows = [
        [
            row.layer,
            row.onnx_value,
            _num(row.max_abs_error),
            _pct(row.max_tolerance_used),
            verdicts[0] if row.passed else verdicts[1],
        ]
        for row in layers
    ]
    return header, rows


def _histogram_lines(histogram: dict[str, int]) -> list[str]:
    """One line per decade bin of absolute error: label, count, and a bar scaled to the
    largest bin."""
    bins = list(HISTOGRAM_BINS) + [key for key in histogram if key not in HISTOGRAM_BINS]
    counts = [int(histogram.get(key, 0)) for key in bins]
    largest = max(counts, default=0)
    label_width = max(len(key) for key in bins)
    count_width = max(len(str(c)) for c in counts)
    lines = []
    for key, count in zip(bins, counts, strict=True):
        bar = "#" * max(1, round(count / largest * _BAR_WIDTH)) if count else ""
        lines.append(f"{key:>{label_width}} {count:>{count_width}} {bar}".rstrip())
    return lines


def _worst_line(o: OutputReport) -> str | None:
    w = o.worst
    if w is None:
        return None
    return (
        f"worst element: index {list(w.index)} of {w.inputs}: onnx {_num(w.onnx)}, "
        f"reference {_num(w.reference)}, abs error {_num(w.abs_error)}, "
        f"{_pct(w.tolerance_used)} of tolerance"
    )


def _float64_line(o: OutputReport) -> str | None:
    """How a gradient that missed the rule against fp32 fared against float64."""
    f = o.float64
    if f is None:
        return None
    inputs = ", ".join(f.inputs)
    routed = ""
    if f.routed_inputs:
        routed = (
            f", and along onnx's own ReLU/clip/max-pool routing on {', '.join(f.routed_inputs)}: "
            f"{_num(f.routed_max_abs_error)} from it"
        )
    spread = ""
    if f.max_spread_used is not None:
        spread = f", {_pct(f.max_spread_used)} of fp32's spread used"
    return (
        f"judged by float64 on {inputs}: onnx {_num(f.onnx_max_abs_error)} from it, the fp32 "
        f"reference {_num(f.reference_max_abs_error)}{routed}{spread}; {f.cleared} of "
        f"{o.mismatches} mismatches cleared"
    )


def _bound_line(o: OutputReport) -> str | None:
    """For task-level checks that pass on their confidence bound alone: why."""
    lines = []
    bound, limit = o.argmax_agreement_upper_bound, o.tolerance.min_argmax_agreement
    if bound is not None and o.argmax_agreement < limit <= bound:
        lines.append(
            f"argmax agreement {_agreement(o.argmax_agreement)} is below "
            f"{_agreement(limit)}, but over {o.argmax_rows} rows its 95% upper bound is "
            f"{_agreement(bound)}: not shown to miss it"
        )
    drop, most = o.accuracy_drop_lower_bound, o.tolerance.max_accuracy_drop
    if drop is not None and o.accuracy_reference - o.accuracy_onnx > most >= drop:
        lines.append(
            f"top-1 accuracy drops {(o.accuracy_reference - o.accuracy_onnx) * 100:.2f} pp, "
            f"more than {most * 100:.2f}, but over {o.accuracy_images} images its 95% lower "
            f"bound is {drop * 100:.2f} pp: not shown to exceed it"
        )
    return "; ".join(lines) or None


def _invalid_line(o: OutputReport) -> str | None:
    """Where the reference itself computed NaN or Inf where numbers belong."""
    if not o.invalid_reference:
        return None
    return (
        f"the reference computes NaN or Inf, not numbers: {o.invalid_reference} elements, "
        f"first on {o.invalid_reference_inputs} (the model itself is broken)"
    )


def _nonfinite_line(o: OutputReport) -> str:
    n = o.nonfinite
    return (
        f"non-finite: onnx {n.onnx_nan} NaN, {n.onnx_inf} Inf; reference {n.reference_nan} NaN, "
        f"{n.reference_inf} Inf; {n.disagreeing} disagreeing"
    )


def _has_nonfinite(o: OutputReport) -> bool:
    n = o.nonfinite
    return any((n.onnx_nan, n.onnx_inf, n.reference_nan, n.reference_inf, n.disagreeing))


def _verdict(report: ParityReport) -> str:
    return "PASSED" if report.passed else "FAILED"


# --- console text -------------------------------------------------------------------------------


def _aligned(header: list[str], rows: list[list], right_from: int = 1) -> list[str]:
    """Columns padded to their widest cell; the first `right_from` columns left-aligned (names),
    the others right-aligned (numbers)."""
    table = [header, *rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(len(header))]
    lines = []
    for r in table:
        cells = [
            str(cell).ljust(w) if i < right_from else str(cell).rjust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def to_text(report: ParityReport) -> str:
    """The console table: a header line, one row per output, then on failure the layer table,
    the first failing layer and where the failing case was saved."""
    lines = [
        f"parity of {report.artifact} against {report.reference}, profile {report.profile}, "
        f"{len(report.inputs)} input sets: {_verdict(report)} in {report.seconds:.1f} s",
        "",
    ]
    lines += _aligned(*_output_table(report, ("ok", "FAIL")))
    for o in report.outputs:
        details = [_float64_line(o), _bound_line(o)]
        if not o.passed:
            details += [_invalid_line(o), _worst_line(o)]
            details.append(_nonfinite_line(o) if _has_nonfinite(o) else None)
            details += [f"task-level check failed: {failure}" for failure in o.task_failures]
        for detail in filter(None, details):
            lines.append(f"  {o.name}: {detail}")
    if report.layers:
        lines += ["", "layer by layer:"]
        lines += ["  " + line for line in _aligned(*_layer_table(report.layers, ("ok", "FAIL")), 2)]
    if report.first_failing_layer:
        lines += ["", f"first failing layer: {report.first_failing_layer}"]
    if report.first_failing_node:
        lines.append(f"first failing node: {report.first_failing_node}")
    if report.repro:
        lines.append(f"failing case saved to {report.repro}")
    lines += [f"not compared: {graph} ({why})" for graph, why in report.not_compared.items()]
    return "\n".join(lines) + "\n"


# --- JUnit XML ----------------------------------------------------------------------------------


def _xml_text(value) -> str:
    return _XML_INVALID.sub("?", str(value))


def _flatten(value, name: str) -> list[tuple[str, str]]:
    """Fingerprint entries as (name, value) pairs: nested mappings as `parent[key]`, lists of
    scalars joined with ", "."""
    if isinstance(value, dict):
        pairs = []
        for key, item in value.items():
            pairs += _flatten(item, f"{name}[{key}]" if name else str(key))
        return pairs
    if isinstance(value, list | tuple):
        if all(not isinstance(item, dict | list | tuple) for item in value):
            return [(name, ", ".join(str(item) for item in value))]
        pairs = []
        for i, item in enumerate(value):
            pairs += _flatten(item, f"{name}[{i}]")
        return pairs
    return [(name, "" if value is None else str(value))]


def _failure_message(o: OutputReport) -> str:
    """One line: max abs error, tolerance used, mismatches, and any failed task-level check."""
    message = (
        f"max abs error {_num(o.max_abs_error)} "
        f"(atol {_num(o.tolerance.atol)}, rtol {_num(o.tolerance.rtol)}), "
        f"tolerance used {_pct(o.max_tolerance_used)}, "
        f"{o.mismatches}/{o.elements} elements out of tolerance"
    )
    if o.task_failures:
        message += "; " + "; ".join(o.task_failures)
    if o.invalid_reference:
        message = f"{_invalid_line(o)}; {message}"
    return " ".join(message.split())


def _failure_text(report: ParityReport, o: OutputReport) -> str:
    lines = [
        f"{o.name} against {report.reference}, profile {report.profile}",
        f"tolerance: |onnx - reference| <= {_num(o.tolerance.atol)} + "
        f"{_num(o.tolerance.rtol)} * |reference|",
        f"mismatches: {o.mismatches}/{o.elements} ({o.fraction_out_of_tolerance * 100:.3g}%)",
        f"abs error: max {_num(o.max_abs_error)}, mean {_num(o.mean_abs_error)}, "
        f"p99 {_num(o.p99_abs_error)}",
        f"rel error: max {_num(o.max_rel_error)}, mean {_num(o.mean_rel_error)}, "
        f"p99 {_num(o.p99_rel_error)}",
    ]
    worst = _worst_line(o)
    if worst:
        lines.append(worst)
    lines.append(_nonfinite_line(o))
    if o.float64 is not None:
        lines.append(_float64_line(o))
    if o.argmax_agreement is not None:
        bound = ""
        if o.argmax_agreement_upper_bound is not None:
            bound = (
                f" over {o.argmax_rows} rows, 95% upper bound "
                f"{_agreement(o.argmax_agreement_upper_bound)}"
            )
        lines.append(
            f"argmax agreement: {_agreement(o.argmax_agreement)}{bound} (at least "
            f"{_agreement(o.tolerance.min_argmax_agreement)})"
        )
    if o.accuracy_onnx is not None and o.accuracy_reference is not None:
        bound = ""
        if o.accuracy_drop_lower_bound is not None:
            bound = (
                f" over {o.accuracy_images} images, 95% lower bound of the drop "
                f"{o.accuracy_drop_lower_bound * 100:.2f} pp"
            )
        lines.append(
            f"accuracy: onnx {o.accuracy_onnx * 100:.2f}%, "
            f"reference {o.accuracy_reference * 100:.2f}% ({_accuracy_delta(o)}{bound}, drop at "
            f"most {o.tolerance.max_accuracy_drop * 100:.2f} pp)"
        )
    lines += [f"task-level check failed: {failure}" for failure in o.task_failures]
    lines += ["abs error histogram:", *("  " + line for line in _histogram_lines(o.histogram))]
    if report.first_failing_layer:
        lines.append(f"first failing layer: {report.first_failing_layer}")
    if report.first_failing_node:
        lines.append(f"first failing node: {report.first_failing_node}")
    if report.repro:
        lines.append(f"failing case saved to {report.repro}")
    return "\n".join(lines) + "\n"


def to_junit_xml(report: ParityReport) -> str:
    """JUnit XML: one testsuite "lossx check", one testcase per output, a <failure> on each
    failing output; the fingerprint, profile and reference as properties."""
    skipped = len(report.not_compared)
    tests, failures = len(report.outputs) + skipped, len(report.failures)
    seconds = f"{report.seconds:.3f}"
    counts = {"tests": str(tests), "failures": str(failures), "errors": "0",
              "skipped": str(skipped)}  # fmt: skip
    root = ET.Element("testsuites", {"name": "lossx", **counts, "time": seconds})
    suite = ET.SubElement(root, "testsuite", {"name": "lossx check", **counts, "time": seconds})
    properties = ET.SubElement(suite, "properties")
    entries = [
        ("artifact", report.artifact),
        ("reference", report.reference),
        ("profile", report.profile),
        ("inputs", ", ".join(report.inputs)),
        *_flatten(report.fingerprint, ""),
    ]
    for name, value in entries:
        ET.SubElement(properties, "property", name=_xml_text(name), value=_xml_text(value))
    for o in report.outputs:
        case = ET.SubElement(
            suite,
            "testcase",
            classname=_xml_text(f"lossx.check.{o.graph}"),
            name=_xml_text(o.output),
            time="0",
        )
        if not o.passed:
            failure = ET.SubElement(
                case, "failure", message=_xml_text(_failure_message(o)), type="ParityMismatch"
            )
            failure.text = _xml_text(_failure_text(report, o))
    for graph, why in report.not_compared.items():
        case = ET.SubElement(suite, "testcase", classname=_xml_text(f"lossx.check.{graph}"),
                             name="(graph)", time="0")  # fmt: skip
        ET.SubElement(case, "skipped", message=_xml_text(why))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


# --- Markdown -----------------------------------------------------------------------------------


def _md_cell(value) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list], right_from: int = 1) -> list[str]:
    align = [":--" if i < right_from else "--:" for i in range(len(header))]
    return ["| " + " | ".join(_md_cell(cell) for cell in r) + " |" for r in [header, align, *rows]]


def _code(value) -> str:
    """Inline code that survives backticks in the value."""
    text = str(value)
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def to_markdown(report: ParityReport) -> str:
    """A CI job summary (e.g. $GITHUB_STEP_SUMMARY): verdict heading, outputs table, the failing
    outputs' worst elements, the layer table, and the fingerprint and histograms folded."""
    icon = "✅" if report.passed else "❌"
    lines = [
        f"## {icon} lossx check {_verdict(report)}",
        "",
        f"{_code(report.artifact)} against {report.reference} · profile {_code(report.profile)}"
        f" · {len(report.inputs)} input sets · {report.seconds:.1f} s",
        "",
        *_md_table(*_output_table(report, ("✅ ok", "❌ FAIL"))),
    ]
    if report.failures:
        lines += ["", "### Failing outputs", ""]
        for o in report.failures:
            details = [_failure_message(o), _worst_line(o), _float64_line(o)]
            if _has_nonfinite(o):
                details.append(_nonfinite_line(o))
            lines.append(f"- **{_md_cell(o.name)}**: " + "; ".join(filter(None, details)))
    judged = [o for o in report.outputs if o.float64 is not None and o.passed]
    if judged:
        lines += ["", "### Judged by float64", ""]
        lines += [f"- **{_md_cell(o.name)}**: {_float64_line(o)}" for o in judged]
    if report.layers:
        lines += ["", "### Layer by layer", ""]
        lines += _md_table(*_layer_table(report.layers, ("✅ ok", "❌ FAIL")), 2)
    if report.first_failing_layer:
        lines += ["", f"**First failing layer:** {_code(report.first_failing_layer)}"]
    if report.first_failing_node:
        lines += ["", f"**First failing node:** {_code(report.first_failing_node)}"]
    if report.repro:
        lines += ["", f"**Failing case saved to** {_code(report.repro)}"]
    if report.not_compared:
        lines += ["", "**Not compared:** " + "; ".join(
            f"{_code(graph)} ({_md_cell(why)})" for graph, why in report.not_compared.items()
        )]  # fmt: skip
    lines += [
        "",
        "<details><summary>Fingerprint and error histograms</summary>",
        "",
        "```json",
        json.dumps(_strict(report.fingerprint), indent=2, allow_nan=False),
        "```",
        "",
    ]
    for o in report.outputs:
        lines += [f"{_code(o.name)} absolute error", "", "```text"]
        lines += _histogram_lines(o.histogram)
        lines += ["```", ""]
    lines.append("</details>")
    return "\n".join(lines) + "\n"


# --- files ----------------------------------------------------------------------------------

RENDERERS = {"json": to_json, "junit": to_junit_xml, "markdown": to_markdown}
REPRO_FILE = "lossx-check-failure.npz"


def write_reports(report: ParityReport, paths: dict[str, Path | None]) -> None:
    """Write `report` in each format of RENDERERS whose path is given, each atomically."""
    for kind, path in paths.items():
        if path is not None:
            text = RENDERERS[kind](report)
            write_atomically(Path(path), lambda f, text=text: f.write(text.encode()))


def repro_beside(paths: list[Path | None]) -> Path | None:
    """Where a failing case goes when no path is asked for: REPRO_FILE beside the first report
    written, else nowhere."""
    given = [Path(p) for p in paths if p is not None]
    return given[0].parent / REPRO_FILE if given else None
