"""The torch side's tables dispatch exhaustively: a loss, a converted precision or a graph kind
added to the runtime's tables without its torch-side entry fails when the module is imported,
not when an export reaches it."""

import subprocess
import sys

from lossx.build.graph_modules import MODULES
from lossx.build.losses import FORMULATIONS
from lossx.build.precision import CONVERTERS
from lossx.runtime.graphs import GraphKind
from lossx.runtime.loss_specs import LOSSES
from lossx.runtime.precisions import PRECISIONS


def test_the_tables_cover_the_runtimes_records():
    assert FORMULATIONS.keys() == LOSSES.keys()
    assert MODULES.keys() == set(GraphKind)
    assert CONVERTERS.keys() == {p.name for p in PRECISIONS.values() if p.converted}


def _import_after(change: str, module: str) -> subprocess.CompletedProcess:
    code = f"import dataclasses\n{change}\nimport {module}\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_loss_without_a_formulation_fails_at_import():
    done = _import_after(
        "from lossx.runtime.loss_specs import LOSSES\n"
        "LOSSES['new'] = dataclasses.replace(LOSSES['mse'], name='new')",
        "lossx.build.losses",
    )
    assert done.returncode != 0 and "ImportError: losses without a formulation" in done.stderr


def test_a_precision_without_a_converter_or_a_profile_fails_at_import():
    add = (
        "from lossx.runtime.precisions import PRECISIONS\n"
        "PRECISIONS['bf16'] = dataclasses.replace(PRECISIONS['fp16'], name='bf16', "
        "tolerance_profile='bf16')"
    )
    done = _import_after(add, "lossx.build.precision")
    assert done.returncode != 0 and "needs a converter" in done.stderr
    done = _import_after(add, "lossx.compare.tolerances")
    assert done.returncode != 0 and "names no profile" in done.stderr
