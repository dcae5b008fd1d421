"""Mutation check: does the fast test suite catch deliberate bugs?

Each mutant is one textual change to one package file. For every mutant the script copies the
repository's `p3b_deploy/`, `tests/` and `pyproject.toml` to a fresh temporary folder, applies the
change there (the real files are never edited), and runs the tests that guard that code
(`pytest -x -q -p no:randomly ...` with PYTHONPATH pointing at the copy). A mutant is *killed* when
pytest fails; the first failing test is recorded. The unmutated copy runs every selection first
(all must pass, else the check is meaningless).

    python benchmarks/mutations.py                     # all mutants -> benchmarks/results/mutations.{md,json}
    python benchmarks/mutations.py --only mean_not_max # one mutant, report to stdout only
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Mutant:
    name: str  # short id
    file: str  # package file, relative to the repository root
    old: str  # exact text replaced (must occur exactly once)
    new: str  # its replacement
    what: str  # the bug, in words
    tests: tuple[str, ...]  # pytest node ids / files that should catch it (plus optional -k)


MUTANTS = [
    Mutant("budget_other_cost_0", "p3b_deploy/pruning/p3b/pruner.py",
           "self.other_cost = float(counts.macs_other if macs else counts.params_other)",
           "self.other_cost = 0.0",
           "trainer budget leaves the never-pruned parameters (embeddings, head) out of the sum",
           ("tests/train/test_trainer.py::test_prune_hits_budget_and_writes_run_dir",)),
    Mutant("checker_mean_not_max", "p3b_deploy/export/onnx_file.py",
           "        diff = float(np.abs(got - ref).max())\n        agr = agreement(ref, got, tie=2 * tol)",
           "        diff = float(np.abs(got - ref).mean())\n        agr = agreement(ref, got, tie=2 * tol)",
           "ONNX parity checker reports the mean instead of the max abs difference",
           ("tests/export/test_exporter.py::test_verify_onnx_numbers_equal_an_independent_computation",)),
    Mutant("kept_index_off_by_one", "p3b_deploy/surgery/core.py",
           "    keep_proj = [h * hd + c for h in heads for c in v]",
           "    keep_proj = [h * hd + (c + 1) % hd for h in heads for c in v]",
           "surgery keeps the proj input column next to the kept v channel (off by one)",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("residual_scatter_shifted", "p3b_deploy/surgery/core.py",
           "        return x.index_add(-1, self.out_idx, y)",
           "        return x.index_add(-1, self.out_idx.flip(0), y)",
           "residual write adds the branch output into the kept dims in the wrong order",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("layer_scale_dropped", "p3b_deploy/surgery/core.py",
           "        if self.gamma is not None:\n            y = y * self.gamma",
           "        if False:\n            y = y * self.gamma",
           "slim branches ignore the layer-scale gamma",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("keep_ratio_clamp", "p3b_deploy/pruning/p3b/budget.py",
           "    return kr.clamp(0.0, 1.0)",
           "    return kr.clamp(0.05, 1.0)",
           "keep ratios clamped to [0.05, 1] instead of [0, 1] (a block can no longer be removed; "
           "an upper bound of 1.5 is an equivalent mutant: the rescaling loop already caps at 1)",
           ("tests/pruning/test_budget.py",)),
    Mutant("qk_indices_swapped", "p3b_deploy/surgery/core.py",
           "    keep_qkv = [t * H * hd + h * hd + c for t, chs in ((0, qk), (1, qk), (2, v)) for h in heads for c in chs]",
           "    keep_qkv = [t * H * hd + h * hd + c for t, chs in ((0, qk), (1, v), (2, qk)) for h in heads for c in chs]",
           "surgery takes k rows with the v channel list and v rows with the qk list",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("attn_macs_no_av", "p3b_deploy/spec.py",
           "            + d.heads * N * N * d.qk + d.heads * N * N * d.v\n",
           "            + d.heads * N * N * d.qk\n",
           "attention MAC count leaves out the attn @ v matmul",
           ("tests/bench/test_macs.py",)),
    Mutant("fp16_tolerance_loose", "p3b_deploy/export/config.py",
           "    fp16_rtol: float = opt(2e-2,",
           "    fp16_rtol: float = opt(2e-1,",
           "fp16 parity bound 10x looser than documented",
           ("tests/export/test_exporter.py::test_fp16_bound_is_two_percent_of_the_logit_scale",)),
    Mutant("triton_dims_swapped", "p3b_deploy/export/triton.py",
           "        dims_in = \", \".join(str(d) for d in lead + list(self.input_size))",
           "        dims_in = \", \".join(str(d) for d in lead + list(self.input_size)[::-1])",
           "Triton config declares the input dims in the wrong order (H, W, C)",
           ("tests/export/test_exporter.py::test_triton_config_parses_with_triton_schema",)),
    Mutant("attention_scale_new_head_dim", "p3b_deploy/surgery/core.py",
           "v_dim=len(v), scale=float(at.scale),",
           "v_dim=len(v), scale=len(qk) ** -0.5,",
           "slim attention uses 1/sqrt(kept qk dim) instead of the original scale",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("round_plan_importance_crash", "p3b_deploy/surgery/core.py",
           "    if not isinstance(imp, Mapping):",
           "    if imp is None:",
           "round_plan trusts meta['importance'] to be per-gate scores (a class name string crashed)",
           ("tests/cli/test_chain.py::test_slim_round_to_on_an_older_torch_pruning_run_dir",)),
    Mutant("plan_counts_miss_nonblock", "p3b_deploy/spec.py",
           "        a, m = dims[i] if dims is not None else (dense_attn_dims(spec, i), dense_mlp_dims(spec, i))",
           "        a, m = dims[i] if dims is not None and i > 0 else (dense_attn_dims(spec, i), dense_mlp_dims(spec, i))",
           "plan counts ignore the first layer's pruning (counts the dense layer 0)",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("throughput_per_batch", "p3b_deploy/bench/stats.py",
           "\"throughput\": batch * 1e3 / med if med > 0 else float(\"inf\"),",
           "\"throughput\": 1e3 / med if med > 0 else float(\"inf\"),",
           "bench throughput forgets the batch size (batches/s instead of images/s)",
           ("tests/bench/test_bench.py",)),
    Mutant("norm_skipped_before_gather", "p3b_deploy/surgery/core.py",
           "        x = self.norm(x)  # statistics over the full embed dim, as in the dense model",
           "        x = x  # (mutant: no LayerNorm)",
           "slim branches skip the LayerNorm before reading their kept residual dims",
           ("tests/surgery/test_core.py::test_slim_equals_masked",)),
    Mutant("grad_accum_not_divided", "p3b_deploy/train/trainer.py",
           "self.scaler.scale(loss / cfg.grad_accum).backward()",
           "self.scaler.scale(loss).backward()",
           "gradient accumulation sums micro-batch losses instead of averaging them",
           ("tests/train/test_accum_amp.py::test_grad_accum_2_x_b_equals_batch_2b",)),
]


def _copy_repo(dst: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "p3b_deploy", dst / "p3b_deploy", ignore=ignore)
    shutil.copytree(ROOT / "tests", dst / "tests", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    for extra in ("examples", "benchmarks", "scripts"):  # tests read configs and scripts from these
        if (ROOT / extra).is_dir():
            shutil.copytree(ROOT / extra, dst / extra, ignore=shutil.ignore_patterns("__pycache__", "results"))


def _apply(dst: Path, m: Mutant) -> None:
    path = dst / m.file
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise SystemExit(f"mutant {m.name}: expected the text once in {m.file}, found it {n} times")
    path.write_text(text.replace(m.old, m.new))


def _pytest(dst: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=str(dst), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-m", "not slow", *tests]
    t0 = time.time()
    try:
        r = subprocess.run(cmd, cwd=dst, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 124, "timeout", time.time() - t0
    return r.returncode, r.stdout + r.stderr, time.time() - t0


def _first_failure(out: str) -> str:
    m = re.search(r"^FAILED (\S+)", out, re.M) or re.search(r"^ERROR (\S+)", out, re.M)
    return m.group(1) if m else "(see log)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="mutant names to run (default: all); no results file is written")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = ap.parse_args()
    mutants = list(MUTANTS)
    if args.only:
        mutants = [m for m in mutants if m.name in args.only]
    t_all = time.time()
    rows = []
    with tempfile.TemporaryDirectory(prefix="p3b-mut-") as tmp:
        base = Path(tmp) / "base"
        _copy_repo(base)
        selections = sorted({t for m in mutants for t in m.tests})
        rc, out, sec = _pytest(base, tuple(selections), args.timeout)
        if rc != 0:
            print(out[-3000:])
            raise SystemExit("the unmutated copy fails its selected tests: fix that first")
        print(f"baseline: {len(selections)} selections pass ({sec:.0f} s)", flush=True)
        for m in mutants:
            d = Path(tmp) / m.name
            _copy_repo(d)
            _apply(d, m)  # exits loudly if the text is gone (the mutant list must follow the code)
            rc, out, sec = _pytest(d, m.tests, args.timeout)
            killed = rc != 0
            rows.append({"mutant": m.name, "file": m.file, "what": m.what, "tests": list(m.tests),
                         "killed": killed, "killed_by": _first_failure(out) if killed else None,
                         "seconds": round(sec, 1)})
            print(f"{m.name}: {'killed by ' + rows[-1]['killed_by'] if killed else 'SURVIVED'} ({sec:.0f} s)",
                  flush=True)
            shutil.rmtree(d, ignore_errors=True)
    total = time.time() - t_all
    if args.only:
        return 0 if all(r["killed"] for r in rows) else 1
    _write(rows, total)
    return 0 if all(r["killed"] for r in rows) else 1


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "timm", "onnx", "onnxruntime", "torch_pruning", "pytest"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            out[mod] = "not installed"
    return out


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write(rows: list[dict], total: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{_cpu()}, {os.cpu_count()} cores (shared)", "versions": _versions(),
            "command": "python benchmarks/mutations.py", "total_seconds": round(total, 1),
            "killed": sum(r["killed"] for r in rows), "mutants": len(rows)}
    (RESULTS / "mutations.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    lines = ["# Mutation check", "",
             f"{meta['killed']} of {meta['mutants']} deliberate bugs are caught by the fast tests "
             f"(total {total / 60:.1f} min, each mutant on a fresh copy of the package; the real files are "
             "never edited).", "",
             f"- command: `{meta['command']}`", f"- date: {meta['date']}", f"- machine: {meta['machine']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "| mutant | file | bug | killed by | s |", "|---|---|---|---|---:|"]
    for r in rows:
        by = f"`{r['killed_by']}`" if r["killed"] else "**SURVIVED**"
        lines.append(f"| {r['mutant']} | `{r['file']}` | {r['what']} | {by} | {r['seconds']:.0f} |")
    lines += ["", "Each mutant runs only the tests that guard its code (`-x`, stop at the first failure); "
              "the unmutated copy passes the same selections first."]
    (RESULTS / "mutations.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
