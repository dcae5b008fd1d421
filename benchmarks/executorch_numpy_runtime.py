"""Does the third-party `executorch-numpy-runtime` run our .pte files exactly? (issue 25)

`executorch-numpy-runtime` (PyPI; numpy only, no torch, built on ExecuTorch 1.3.1) would give a
torch-free way to check a `.pte` on a device. This script asks whether it runs the programs that
`export --format executorch` writes (lowered with ExecuTorch 1.5.1 here), exactly:

- for each given .pte: the `forward` method on seeded random images at batch 1 and 7, compared with
  ExecuTorch's own Python runtime (this project's bench backend) on the same inputs: max abs
  difference and top-1 agreement;
- the `p3b_metadata` method (the file's preprocessing and class names, a string constant);
- what it offers to size XNNPACK's thread pool (the bench backend's `--threads`).

The numpy runtime runs in its own interpreter (`--python`, default: a venv made in WORK_DIR from
`--base-python`, Python >= 3.12, which is all the package is built for). Correctness only: the two
runtimes live in different processes, so no latency ratio is claimed here.

    .venv-edge/bin/python -m p3b_deploy export vit_nano_patch4_16 --checkpoint \
        p3b_deploy/assets/vit_nano_mnist5k.safetensors --num-classes 10 --img-size 28 \
        --out /tmp/enr/demo.onnx --format executorch --int8 static --data mnist5k
    .venv-edge/bin/python benchmarks/executorch_numpy_runtime.py --pte /tmp/enr/demo.pte /tmp/enr/demo.int8.pte
Writes benchmarks/results/executorch_numpy_runtime.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from p3b_deploy.bench.sysinfo import system_info
from p3b_deploy.executorch_io import load_pte, set_threads
from p3b_deploy.io import write_json, write_text

PIN = "executorch-numpy-runtime==1.4.0"
BATCHES = (1, 7)

CHILD = r"""
import json, sys, numpy as np, executorch_numpy_runtime as enr
import executorch_numpy_runtime._core as core
work = sys.argv[1]
job = json.load(open(f"{work}/job.json"))
rt = enr.Runtime.get()
out = {"version": enr.__version__, "et_version": enr.__et_version__,
       "backends": enr.runtime_info().get("backends"),
       "thread_api": sorted(n for n in dir(core) if "thread" in n.lower()), "files": {}}
for i, f in enumerate(job["files"]):
    rec = {}
    try:
        prog = rt.load_program(f)
        rec["methods"] = prog.method_names
        fwd = prog.load_method("forward")
        for b in job["batches"]:
            x = np.load(f"{work}/x{b}.npy")
            np.save(f"{work}/y{i}_{b}.npy", fwd([x])[0])
        try:
            rec["metadata"] = str(prog.load_method("p3b_metadata")([]))[:200]
        except Exception as e:
            rec["metadata_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    except Exception as e:
        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    out["files"][f] = rec
json.dump(out, open(f"{work}/child.json", "w"), indent=1)
"""


def numpy_runtime_python(args) -> str:
    if args.python:
        return args.python
    venv = Path(args.work_dir) / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([args.base_python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", PIN, "numpy"], check=True)
    return str(py)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pte", nargs="+", required=True, help=".pte files written by export --format executorch")
    p.add_argument("--python", default=None, help="a Python with executorch-numpy-runtime installed")
    p.add_argument("--base-python", default="python3.12", help="Python >= 3.12 to make that venv from")
    p.add_argument("--work-dir", default="/tmp/p3b-executorch-numpy-runtime")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "executorch_numpy_runtime"))
    args = p.parse_args()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    files = [str(Path(f).resolve()) for f in args.pte]
    set_threads(1)
    progs = [load_pte(f) for f in files]
    shape = progs[0].input_shape
    rng = np.random.default_rng(0)
    ref = {}
    for b in BATCHES:
        x = rng.standard_normal((b, *shape)).astype(np.float32)
        np.save(work / f"x{b}.npy", x)
        for i, prog in enumerate(progs):
            ref[i, b] = prog.forward(x)
    write_json(work / "job.json", {"files": files, "batches": list(BATCHES)})
    py = numpy_runtime_python(args)
    subprocess.run([py, "-c", CHILD, str(work)], check=True)
    child = json.loads((work / "child.json").read_text())
    rows = []
    for i, f in enumerate(files):
        rec = child["files"][f]
        row = {"file": Path(f).name, "methods": rec.get("methods"), "error": rec.get("error"),
               "metadata": "read" if "metadata" in rec else rec.get("metadata_error"),
               "metadata_in_file": bool(progs[i].metadata)}
        for b in BATCHES:
            y = work / f"y{i}_{b}.npy"
            if y.exists():
                got = np.load(y)
                row[f"b{b}_max_abs_diff"] = float(np.abs(got - ref[i, b]).max())
                row[f"b{b}_top1_agreement"] = float((got.argmax(1) == ref[i, b].argmax(1)).mean())
        rows.append(row)
    res = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "system": system_info(1),
           "numpy_runtime": {k: child[k] for k in ("version", "et_version", "backends", "thread_api")},
           "numpy_runtime_python": subprocess.run([py, "-c", "import sys; print(sys.version.split()[0])"],
                                                  capture_output=True, text=True).stdout.strip(),
           "executorch": importlib.metadata.version("executorch"),
           "command": "python " + " ".join(sys.argv), "rows": rows}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), res)
    write_text(out.with_suffix(".md"), to_markdown(res))
    print(out.with_suffix(".md").read_text())
    return 0


def to_markdown(res: dict) -> str:
    nr, s = res["numpy_runtime"], res["system"]
    v = s.get("versions") or {}
    lines = ["# executorch-numpy-runtime on our .pte files", "",
             f"Date {res['date']}; CPU {s.get('cpu')}; executorch {res['executorch']} (lowering and reference "
             f"runtime, torch {v.get('torch', '?')}); executorch-numpy-runtime {nr['version']} (built on ExecuTorch "
             f"{nr['et_version']}, backends {', '.join(nr['backends'] or [])}) under Python {res['numpy_runtime_python']}.", "",
             f"Command: `{res['command']}`", "",
             "Reference: ExecuTorch's own Python runtime (the `executorch` bench backend) on the same seeded "
             "random images. Correctness only, no latency (two processes).", "",
             "| file | methods | batch 1 max abs diff | batch 7 max abs diff | top-1 agreement | p3b_metadata |",
             "|---|---|---:|---:|---:|---|"]
    for r in res["rows"]:
        if r.get("error"):
            lines.append(f"| {r['file']} | load failed: {r['error']} | | | | |")
            continue
        agree = min(r.get(f"b{b}_top1_agreement", 0.0) for b in BATCHES)
        lines.append(f"| {r['file']} | {', '.join(r['methods'] or [])} | {r.get('b1_max_abs_diff', float('nan')):.1e} | "
                     f"{r.get('b7_max_abs_diff', float('nan')):.1e} | {agree:.0%} | {r['metadata']} |")
    thread = ", ".join(nr["thread_api"]) or "none"
    lines += ["", f"Thread-pool control offered by the numpy runtime: {thread}.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
