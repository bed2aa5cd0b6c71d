"""How fast the runtime side is: ONNX Runtime against torch.compile and eager PyTorch, eval end to
end, a roofline.

    python bench/runtime_speed.py ARTIFACT_DIR --data-dir ../shared/data/cifar10 \\
        --threads 2 --repeats 5

ARTIFACT_DIR comes from `lossx export`. Prints one table, in one run:

1. the model graph alone (inputs converted to float32 NCHW beforehand): ONNX Runtime,
   torch.compile and eager PyTorch (both the model rebuilt with the artifact's weights, under
   torch.inference_mode) at batch 1, 64 and 256 with the same thread count; images/s, and
   per-call latency p50/p99. torch.compile is what a PyTorch user would pick instead: the default
   inductor backend on the CPU, one graph per batch size (dynamic=False, as a server with a fixed
   batch has). Its compile time is reported apart, per batch size: first into an empty inductor
   cache (a temporary directory: what a first start costs), then again from the cache that
   filled (what a restart costs); the second compilation's model is the one timed;
2. `lossx.runtime.evaluate` (what `lossx eval` runs) over 10,000 images at batch 256: end to
   end images/s (preprocessing, model and loss graphs) as a share of the model-only figure;
3. a roofline: this machine's fp32 matrix-multiply FLOP/s (numpy, torch.mm and an ONNX Runtime
   MatMul, several sizes, the best taken as the peak) against the model's FLOPs per image
   (2 x MACs of every Conv2d and Linear, counted with forward hooks);
4. start-up: median wall time of `lossx --help`, `lossx eval ARTIFACT_DIR --limit 1` and
   `python -c "import torch"` in fresh processes, and whether the runtime side loads torch;
5. the goals, each MET or MISSED.

Every throughput is the best of --repeats trials of at least --min-seconds each, after a
warm-up; ORT, torch.compile and eager trials alternate so drifting load hits all three. Run it on
a quiet machine: other work on the same cores shows up directly in these figures.
"""

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from torch import nn

from lossx.build.eager import EagerRunner
from lossx.runtime import (
    ImageSet,
    evaluate,
    load_artifact,
    load_cifar10,
    load_packaged_sample,
)
from lossx.runtime.cifar10 import CONTRACT
from lossx.runtime.options import SessionOptions
from lossx.runtime.session import open_session

BATCH_SIZES = (1, 64, 256)
EVAL_IMAGES = 10_000
EVAL_BATCH = 256
GEMM_SIZES = (256, 512, 1024, 2048)
STARTUP_RUNS = 5
GOAL_SPEEDUP = 2.5  # ORT over eager at batch 64
GOAL_COMPILE_SPEEDUP = 1.15  # ORT over torch.compile at batches 64 and 256
GOAL_EVAL_SHARE = 0.85  # eval end to end over model-only ORT at batch 256
GOAL_ROOFLINE_SHARE = 0.75  # best model-only ORT over the sgemm roofline

# numpy's OpenBLAS reads its thread count once, when numpy loads: it runs in a child process.
_NUMPY_GEMM = """
import json, sys, time
import numpy as np
sizes, trials, trial_seconds = json.loads(sys.argv[1])
best = {}
for n in sizes:
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    c = np.empty_like(a)
    np.matmul(a, b, out=c)
    rates = []
    for _ in range(trials):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < trial_seconds or calls < 2:
            np.matmul(a, b, out=c)
            calls += 1
        rates.append(2 * n**3 * calls / elapsed)
    best[n] = max(rates)
print(json.dumps(best))
"""


def timed_calls(step: Callable[[], object], seconds: float) -> list[float]:
    """Call `step` until `seconds` have passed (at least twice); the seconds of each call."""
    laps = []
    clock = time.perf_counter
    started = last = clock()
    while last - started < seconds or len(laps) < 2:
        step()
        now = clock()
        laps.append(now - last)
        last = now
    return laps


def model_batches(images: np.ndarray, batch: int) -> list[np.ndarray]:
    """Float32 NCHW batches of `batch` real images, as many full ones as `images` holds."""
    return [
        CONTRACT.to_model_input(images[s : s + batch])
        for s in range(0, len(images) - batch + 1, batch)
    ]


def compile_model(model: nn.Module, examples: dict[int, torch.Tensor]) -> tuple[nn.Module, dict]:
    """torch.compile(model) with one graph per batch size, and per batch size the seconds of its
    first call (the compilation) into an empty inductor cache and again from the cache it filled,
    with the largest logit difference from eager."""
    compiled, report = None, {batch: {} for batch in examples}
    with torch.inference_mode():
        for cache in ("cold", "warm"):
            torch._dynamo.reset()  # forget the compiled graphs; the on-disk cache stays
            compiled = torch.compile(model, dynamic=False)
            for batch, images in examples.items():
                started = time.perf_counter()
                logits = compiled(images)
                report[batch][cache] = time.perf_counter() - started
                report[batch]["max_diff"] = (logits - model(images)).abs().max().item()
    return compiled, report


def model_only(
    artifact, split: ImageSet, threads: int, repeats: int, seconds: float
) -> tuple[dict, dict]:
    """Per batch size and engine: best and median images/s, and every call's latency; and
    torch.compile's compile times (`compile_model`)."""
    spec = artifact.graph("model").spec
    session = open_session(artifact.path / spec.file, SessionOptions(threads=threads))
    (input_name,), outputs = spec.input_names, spec.output_names
    model = EagerRunner.of_artifact(artifact).model.eval()
    batches = {batch: model_batches(split.images, batch) for batch in BATCH_SIZES}
    examples = {batch: torch.from_numpy(arrays[0]) for batch, arrays in batches.items()}
    compiled, compile_report = compile_model(model, examples)
    steps = {}
    for batch, arrays in batches.items():
        tensors = [torch.from_numpy(a) for a in arrays]
        feeds = itertools.cycle([{input_name: a} for a in arrays])
        steps[batch, "ort"] = lambda feeds=feeds: session.run(outputs, next(feeds))
        inputs = itertools.cycle(tensors)
        steps[batch, "compile"] = lambda inputs=inputs: compiled(next(inputs))
        inputs = itertools.cycle(tensors)
        steps[batch, "eager"] = lambda inputs=inputs: model(next(inputs))
    results = {key: {"rates": [], "laps": []} for key in steps}
    with torch.inference_mode():
        for step in steps.values():
            timed_calls(step, min(0.5, seconds / 2))  # warm-up
        for _ in range(repeats):
            for (batch, engine), step in steps.items():
                laps = timed_calls(step, seconds)
                results[batch, engine]["rates"].append(batch * len(laps) / sum(laps))
                results[batch, engine]["laps"] += laps
    return results, compile_report


def eval_workload(data_dir: Path | None) -> ImageSet:
    """10,000 images: training images 0-9999 with --data-dir, else the sample repeated."""
    if data_dir is not None:
        return load_cifar10(data_dir, "train", EVAL_IMAGES)
    sample = load_packaged_sample()
    copies = -(-EVAL_IMAGES // len(sample))
    return ImageSet(
        np.tile(sample.images, (copies, 1, 1, 1))[:EVAL_IMAGES],
        np.tile(sample.labels, copies)[:EVAL_IMAGES],
        sample.class_names,
        f"{sample.source}, repeated {copies}x",
    )


def gemm_rate(matmul: Callable[[], object], n: int, trials: int, seconds: float) -> float:
    """Best FLOP/s of `matmul` (an n x n by n x n product) over `trials` timed trials."""
    matmul()  # warm-up
    trial_laps = [timed_calls(matmul, seconds) for _ in range(trials)]
    return max(2 * n**3 * len(laps) / sum(laps) for laps in trial_laps)


def ort_matmul_session(n: int, threads: int) -> ort.InferenceSession:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "sgemm",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [n, n]) for name in "ab"],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"]
    )


def gemm_peaks(threads: int, trials: int, seconds: float) -> dict[str, dict[int, float]]:
    """FLOP/s per library and matrix size."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    child = subprocess.run(
        [sys.executable, "-c", _NUMPY_GEMM, json.dumps([GEMM_SIZES, trials, seconds])],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    peaks = {"numpy": {int(n): r for n, r in json.loads(child.stdout).items()}}
    peaks["torch.mm"], peaks["ORT MatMul"] = {}, {}
    rng = np.random.default_rng(0)
    for n in GEMM_SIZES:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.empty(n, n)
        with torch.inference_mode():
            peaks["torch.mm"][n] = gemm_rate(partial(torch.mm, ta, tb, out=tc), n, trials, seconds)
        session, feed = ort_matmul_session(n, threads), {"a": a, "b": b}
        peaks["ORT MatMul"][n] = gemm_rate(partial(session.run, None, feed), n, trials, seconds)
    return peaks


def layer_flops(model: nn.Module) -> list[tuple[str, int]]:
    """(layer, FLOPs) for one 3x32x32 image: 2 x MACs of every Conv2d and Linear."""
    rows = []

    def record(module: nn.Module, inputs, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            k_h, k_w = module.kernel_size
            macs = output.numel() * module.in_channels // module.groups * k_h * k_w
            name = f"conv {module.in_channels}->{module.out_channels} {k_h}x{k_w}"
        else:
            macs = output.numel() * module.in_features
            name = f"linear {module.in_features}->{module.out_features}"
        rows.append((name, 2 * macs))

    layers = [m for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    handles = [m.register_forward_hook(record) for m in layers]
    with torch.inference_mode():
        model(torch.zeros(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    return rows


def startup_seconds(command: list[str]) -> float:
    """Median wall time of `command` in a fresh process, after one untimed run."""
    subprocess.run(command, capture_output=True, check=True)  # page cache, .pyc files
    times = []
    for _ in range(STARTUP_RUNS):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def loads_torch(code: str) -> str:
    """'yes' or 'no': is torch in sys.modules after running `code` in a fresh interpreter?"""
    check = f"{code}\nimport sys\nprint('torch' in sys.modules)"
    child = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    )
    return "yes" if child.stdout.split()[-1] == "True" else "no"


def verdict(value: float, goal: float, unit: str) -> str:
    gap = f"{abs(value - goal):.2f}x" if unit == "x" else f"{abs(value - goal) * 100:.1f} pp"
    return f"MET (+{gap})" if value >= goal else f"MISSED by {gap}"


def load_line(when: str, cpus: int) -> str:
    """The load averages, with a warning when other work already fills the CPUs."""
    load = os.getloadavg()
    line = f"load average at {when} " + " ".join(f"{x:.2f}" for x in load)
    if load[0] >= cpus - 0.5:
        line += (
            f"\nWARNING: 1-minute load {load[0]:.2f} on {cpus} CPUs: other processes share these "
            "cores; every figure is depressed, eager PyTorch's OpenMP barriers most of all"
        )
    return line


def simd_flags() -> list[str]:
    """Which of AVX2, AVX-512 (F) and AVX-512 VNNI /proc/cpuinfo lists."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return []
    names = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI"}
    return [label for flag, label in names.items() if flag in flags]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="Timed trials per cell.")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="Length of each trial.")
    args = parser.parse_args()
    threads, repeats, seconds = args.threads, args.repeats, args.min_seconds
    torch.set_num_threads(threads)  # inductor's kernels take their thread count from it too
    # An empty inductor cache for this run, so torch.compile's cold compile time is a first
    # start's whatever ran before; removed when the bench exits.
    inductor_cache = tempfile.TemporaryDirectory(prefix="runtime-speed-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache.name
    lossx = Path(sys.executable).with_name("lossx")
    artifact = load_artifact(args.artifact)
    images = load_cifar10(args.data_dir, "test") if args.data_dir else load_packaged_sample()

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}, numpy {np.__version__}, "
        f"python {platform.python_version()}"
    )
    print(
        f"{cpu_name()}: {os.cpu_count()} CPUs ({usable} usable); {threads} threads "
        f"(ORT intra-op, torch.set_num_threads = {torch.get_num_threads()}, OpenBLAS); "
        f"CPU flags: {', '.join(simd_flags()) or 'no AVX2'}"
    )
    print(f"{load_line('start', usable)}; best of {repeats} trials of >= {seconds:g} s per cell")

    cells, compile_report = model_only(artifact, images, threads, repeats, seconds)
    engines = {"ort": "ORT", "compile": "compile", "eager": "eager"}
    rate = {(b, e): max(cells[b, e]["rates"]) for b in BATCH_SIZES for e in engines}
    ort_rate = {b: rate[b, "ort"] for b in BATCH_SIZES}
    eager_rate = {b: rate[b, "eager"] for b in BATCH_SIZES}
    compile_rate = {b: rate[b, "compile"] for b in BATCH_SIZES}
    print(f"\n1. model only, {len(images):,} images of {images.source} (images/s: best, median)")
    print(
        f"{'batch':>5}"
        + "".join(f"{label + ' best':>{len(label) + 7}}{'median':>8}" for label in engines.values())
        + f"{'ORT/compile':>13}{'ORT/eager':>11}"
    )
    for b in BATCH_SIZES:
        row = f"{b:>5}"
        for engine, label in engines.items():
            rates = cells[b, engine]["rates"]
            row += f"{max(rates):>{len(label) + 7},.0f}{statistics.median(rates):>8,.0f}"
        row += f"{ort_rate[b] / compile_rate[b]:>12.2f}x{ort_rate[b] / eager_rate[b]:>10.2f}x"
        print(row)
    print(f"{'batch':>5}" + "".join(f"{label + ' p50/p99 ms':>21}" for label in engines.values()))
    for b in BATCH_SIZES:
        row = f"{b:>5}"
        for engine in engines:
            p50, p99 = np.percentile(cells[b, engine]["laps"], [50, 99]) * 1e3
            row += f"{p50:>13.3f}/{p99:<7.3f}"
        print(row.rstrip())
    print(
        "   torch.compile (inductor, dynamic=False), compile time per batch size, into an empty "
        "cache / from the cache it filled:"
    )
    print(
        "     "
        + "; ".join(
            f"batch {b} {r['cold']:.1f} s / {r['warm']:.1f} s" for b, r in compile_report.items()
        )
        + f" (max |compiled - eager| logit "
        f"{max(r['max_diff'] for r in compile_report.values()):.1e})"
    )

    workload = eval_workload(args.data_dir)
    options = SessionOptions(threads=threads)
    evaluate(artifact, workload.head(2 * EVAL_BATCH), EVAL_BATCH, options)  # warm-up
    runs = [evaluate(artifact, workload, EVAL_BATCH, options) for _ in range(repeats)]
    best = max(runs, key=lambda r: r.images_per_second)
    eval_share = best.images_per_second / ort_rate[EVAL_BATCH]
    print(f"\n2. lossx eval end to end, {len(workload):,} images of {workload.source}")
    print(
        f"   batch {EVAL_BATCH}, losses {', '.join(artifact.manifest.loss_names)}; "
        f"top-1 {best.top1_accuracy:.2%}; best of {repeats} run(s)"
    )
    print(
        f"   end to end {best.images_per_second:>10,.0f} images/s  ({best.seconds:.2f} s; median "
        f"{statistics.median(r.images_per_second for r in runs):,.0f})"
    )
    print(f"   model graph inside eval {best.model_images_per_second:>10,.0f} images/s")
    print(
        f"   = {eval_share:.1%} of model-only ORT at batch {EVAL_BATCH} "
        f"({ort_rate[EVAL_BATCH]:,.0f} images/s, section 1)"
    )

    peaks = gemm_peaks(threads, max(3, repeats), max(0.1, seconds / 4))
    peak_name, peak_size, peak = max(
        ((name, n, rate) for name, rates in peaks.items() for n, rate in rates.items()),
        key=lambda item: item[2],
    )
    flops = layer_flops(EagerRunner.of_artifact(artifact).model.eval())
    per_image = sum(f for _, f in flops)
    roofline = peak / per_image
    best_batch = max(BATCH_SIZES, key=lambda b: ort_rate[b])
    ort_best = ort_rate[best_batch]
    roofline_share = ort_best / roofline
    print(f"\n3. roofline: fp32 matrix multiply, GFLOP/s with {threads} threads (best of trials)")
    print(f"{'n':>7}" + "".join(f"{name:>13}" for name in peaks))
    for n in GEMM_SIZES:
        print(f"{n:>7}" + "".join(f"{peaks[name][n] / 1e9:>13.1f}" for name in peaks))
    print(f"   peak {peak / 1e9:.1f} GFLOP/s ({peak_name}, n={peak_size})")
    print(f"   model FLOPs per image {per_image / 1e6:.2f} M (2 x MACs of each Conv2d and Linear):")
    print("     " + ", ".join(f"{name} {f / 1e6:.3g} M" for name, f in flops))
    print(f"   roofline {roofline:,.0f} images/s; ORT's best {ort_best:,.0f} (batch {best_batch})")
    print(
        f"   ORT = {roofline_share:.1%} of the roofline, sustaining "
        f"{ort_best * per_image / 1e9:.1f} GFLOP/s"
    )
    blas = max(rate for name in ("numpy", "torch.mm") for rate in peaks[name].values())
    print(
        f"   against the BLAS libraries alone (numpy, torch.mm: {blas / 1e9:.1f} GFLOP/s) "
        f"ORT would be {ort_best * per_image / blas:.1%}"
    )
    if ort_best * per_image > peak:
        print("   NOTE: ORT runs the model faster than the measured sgemm peak: the peak is low")

    commands = {
        "lossx --help": [str(lossx), "--help"],
        f"lossx eval {args.artifact} --limit 1": [
            str(lossx),
            "eval",
            str(args.artifact),
            "--limit",
            "1",
        ],
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        'python -c "pass"': [sys.executable, "-c", "pass"],
    }
    width = max(len(label) for label in commands)
    print(f"\n4. start-up, median wall time of {STARTUP_RUNS} fresh processes")
    for label, command in commands.items():
        print(f"   {label:<{width}}  {startup_seconds(command):6.3f} s")
    eval_code = (
        "from lossx.cli import main\n"
        f"main(['eval', {str(args.artifact)!r}, '--limit', '1'], standalone_mode=False)"
    )
    print(
        f"   torch in sys.modules after import lossx.cli, lossx.runtime: "
        f"{loads_torch('import lossx.cli, lossx.runtime')}"
    )
    print(
        f"   torch in sys.modules after lossx eval --limit 1 in-process: {loads_torch(eval_code)}"
    )

    speedup = ort_rate[64] / eager_rate[64]
    goals = [
        (
            f"ORT >= {GOAL_COMPILE_SPEEDUP}x torch.compile at batch {b}",
            f"{ort_rate[b] / compile_rate[b]:.2f}x",
            ort_rate[b] / compile_rate[b],
            GOAL_COMPILE_SPEEDUP,
            "x",
        )
        for b in (64, 256)
    ] + [
        (
            f"ORT >= {GOAL_SPEEDUP}x eager at batch 64",
            f"{speedup:.2f}x",
            speedup,
            GOAL_SPEEDUP,
            "x",
        ),
        (
            f"eval end to end >= {GOAL_EVAL_SHARE:.0%} of model-only",
            f"{eval_share:.1%}",
            eval_share,
            GOAL_EVAL_SHARE,
            "%",
        ),
        (
            f"ORT >= {GOAL_ROOFLINE_SHARE:.0%} of roofline",
            f"{roofline_share:.1%}",
            roofline_share,
            GOAL_ROOFLINE_SHARE,
            "%",
        ),
    ]
    print("\n5. goals")
    width = max(len(label) for label, *_ in goals) + 2
    for label, shown, value, goal, unit in goals:
        print(f"   {label:<{width}}{shown:>6}  {verdict(value, goal, unit)}")
    print(load_line("end", usable))


if __name__ == "__main__":
    main()
