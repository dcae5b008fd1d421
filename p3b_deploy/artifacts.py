"""The artifacts that stages hand each other, and the one set of rules that tells them apart.

    run dir   `prune` output: plan.json + model.safetensors (dense fine-tuned weights), plus
              config.json (the resolved run config), metrics.jsonl, report.md, checkpoint.pt
    slim dir  `slim` / `finetune` output: config.json (format "p3b-slim") + model.safetensors
    ONNX file `export` output: <name>.onnx (+ <name>.export.json), metadata_props with the keys
              of `p3b_deploy.export.metadata`
    .pte file `export --format executorch` output next to <name>.onnx: an ExecuTorch program
              (XNNPACK) carrying the same metadata (`p3b_deploy.executorch_io`)
    .tflite   `export --format litert` output next to <name>.onnx: a LiteRT model (one signature per
              batch; <name>.int8.tflite with --int8 static) carrying the same metadata (`p3b_deploy.litert_io`)
    plan file a plan.json on its own
    timm name a dense model by name (the baseline)

`resolve(path_or_name)` applies the detection rules below, in order, for every stage (export,
bench, inspect, finetune, prune --resume, run); each kind loads itself (`RunDir.load_dense()`,
`SlimDir.load()`, ...). Importing this module imports no torch: loading does, when asked.

Detection, first match wins:
  1. a path ending in .onnx                                -> OnnxFile
     a path ending in .pte                                 -> PteFile
     a path ending in .tflite                              -> TfliteFile
  2. a folder with plan.json                               -> RunDir (a run dir's config.json is the
                                                              run config, never a slim config)
  3. a folder whose config.json has format "p3b-slim"      -> SlimDir
  4. a folder with checkpoint.pt but no plan.json          -> error: an unfinished prune run
  5. a folder holding exactly one .onnx file               -> OnnxFile (when ONNX is accepted)
  6. a file ending in .json                                -> PlanFile
  7. an existing path of any other shape                   -> error
  8. a name without path separators or suffix              -> TimmName
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

from .errors import P3BError

PLAN = "plan.json"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CHECKPOINT = "checkpoint.pt"
SLIM_FORMAT = "p3b-slim"

KINDS = ("run", "slim", "onnx", "pte", "tflite", "plan", "timm")


class ArtifactError(P3BError):
    """A path that is not the artifact a stage needs (or not found)."""


@dataclass(frozen=True)
class RunDir:
    """A `prune` run dir: dense fine-tuned weights + the plan surgery builds from."""
    path: Path
    kind = "run"

    @property
    def plan_path(self) -> Path:
        return self.path / PLAN

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS

    def plan(self):
        """The validated Plan (plan.json)."""
        from .plan import Plan
        return Plan.load(self.plan_path)

    def run_config(self) -> dict[str, Any]:
        """config.json written by `prune`: {"config", "model", "model_kwargs", "source", "data"}."""
        from .io import read_json
        d = read_json(self.path / CONFIG, "run config")
        if not isinstance(d, dict) or not isinstance(d.get("config"), dict):
            raise ArtifactError(f"{self.path / CONFIG} is not a prune run config")
        return d

    def load_dense(self):
        """The dense fine-tuned model (timm skeleton from the plan + model.safetensors)."""
        from .models.vit import load_model
        if not self.weights_path.is_file():
            raise ArtifactError(f"run dir has no dense weights: {self.weights_path} is missing")
        plan = self.plan()
        return load_model(plan.model, checkpoint=self.weights_path, **plan.model_kwargs())

    def slim(self, round_to: int = 1, residual_io: Any = "index"):
        """The slim model surgery builds from this run (verified against the masked model)."""
        from .surgery.core import slim
        return slim(self.load_dense(), self.plan(), round_to=round_to, residual_io=residual_io, verify=True)


@dataclass(frozen=True)
class SlimDir:
    """A slim model folder: config.json (format p3b-slim) + model.safetensors."""
    path: Path
    kind = "slim"

    def config(self) -> dict[str, Any]:
        from .surgery.store import read_slim_config
        return read_slim_config(self.path)

    def plan(self):
        from .surgery.store import plan_of_config
        return plan_of_config(self.config(), self.path / CONFIG)

    def load(self):
        from .surgery.store import load_slim
        return load_slim(self.path)


@dataclass(frozen=True)
class OnnxFile:
    """An exported ONNX model."""
    path: Path
    kind = "onnx"

    def metadata(self) -> dict[str, str]:
        """metadata_props (read with onnxruntime alone: works on an edge install)."""
        from .onnx_io import load_onnx_session
        return load_onnx_session(self.path)[1]

    def check(self) -> None:
        """Refuse a file that is not a loadable ONNX model (one line), before a runtime times it."""
        from .onnx_io import check_onnx_file
        check_onnx_file(self.path)


@dataclass(frozen=True)
class _RuntimeFile:
    """A file `export --format NAME` wrote next to <name>.onnx for another runtime."""
    path: Path

    @property
    def onnx_name(self) -> Path:
        """The fp32 ONNX file exported with it: `m.onnx` for `m.pte` / `m.tflite` and for their int8
        files `m.int8.pte` / `m.int8.tflite`."""
        return self.path.with_name(self.path.name[:-len(self.path.suffix)].removesuffix(".int8") + ".onnx")

    @property
    def onnx_sibling(self) -> Path | None:
        """`onnx_name`, if it is there: the parity reference (ORT fp32)."""
        p = self.onnx_name
        return p if p.is_file() else None


@dataclass(frozen=True)
class PteFile(_RuntimeFile):
    """An exported ExecuTorch program (bench backend `executorch`)."""
    kind = "pte"

    def check(self) -> None:
        """Refuse a file that is not an ExecuTorch program (one line); needs no ExecuTorch runtime."""
        from .executorch_io import check_pte_file
        check_pte_file(self.path)

    def load(self):
        """The loaded program (`executorch_io.PteProgram`); needs executorch."""
        from .executorch_io import load_pte
        return load_pte(self.path)


@dataclass(frozen=True)
class TfliteFile(_RuntimeFile):
    """An exported LiteRT model (bench backend `litert`); loading needs ai-edge-litert, not torch."""
    kind = "tflite"

    def load(self, threads: int | None = None):
        """The loaded model (`litert_io.TfliteProgram`)."""
        from .litert_io import load_tflite
        return load_tflite(self.path, threads)

    def metadata(self) -> dict[str, str]:
        from .litert_io import read_metadata
        return read_metadata(self.path)


@dataclass(frozen=True)
class PlanFile:
    """A plan.json on its own."""
    path: Path
    kind = "plan"

    def plan(self):
        from .plan import Plan
        return Plan.load(self.path)


@dataclass(frozen=True)
class TimmName:
    """A dense timm model by name (the baseline)."""
    name: str
    kind = "timm"

    @property
    def path(self) -> Path:  # for uniform reporting; a name is not a path
        return Path(self.name)

    def load(self, **kwargs: Any):
        from .models.vit import load_model
        return load_model(self.name, **kwargs)


Artifact = Union[RunDir, SlimDir, OnnxFile, PteFile, TfliteFile, PlanFile, TimmName]
_NAMES = {"run": "a run dir (plan.json + model.safetensors)", "slim": "a slim dir (config.json + model.safetensors)",
          "onnx": "an .onnx file", "pte": "an ExecuTorch .pte file",
          "tflite": "a LiteRT .tflite file", "plan": "a plan.json", "timm": "a timm model name"}


def _config_format(path: Path) -> str | None:
    """The format tag of path/config.json; ArtifactError if it is not readable JSON."""
    try:
        d = json.loads((path / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path / CONFIG} is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    return d.get("format") if isinstance(d, dict) else None


def detect(source: str | os.PathLike) -> Artifact:
    """Classify `source` by the module's rules (see the docstring); nothing is loaded."""
    text = os.fspath(source)
    p = Path(text)
    if p.suffix == ".onnx":
        if not p.is_file():
            raise ArtifactError(f"ONNX file not found: {p}")
        return OnnxFile(p)
    if p.suffix == ".pte":
        if not p.is_file():
            raise ArtifactError(f"ExecuTorch program not found: {p}")
        return PteFile(p)
    if p.suffix == ".tflite":
        if not p.is_file():
            raise ArtifactError(f"LiteRT model not found: {p}")
        return TfliteFile(p)
    if p.is_dir():
        if (p / PLAN).is_file():
            return RunDir(p)
        fmt = _config_format(p) if (p / CONFIG).is_file() else None
        if fmt == SLIM_FORMAT:  # (a finished `finetune` keeps its training checkpoint.pt beside it)
            return SlimDir(p)
        if (p / CHECKPOINT).is_file():
            raise ArtifactError(f"{p} is an unfinished prune run (checkpoint.pt, no plan.json yet): "
                                f"finish it with `p3b-deploy prune --resume {p}`")
        if (p / CONFIG).is_file():
            raise ArtifactError(f"{p / CONFIG} is neither a prune run's nor a p3b slim config "
                                f"(format {fmt!r}, expected {SLIM_FORMAT!r})")
        onnx = sorted(p.glob("*.onnx"))
        if len(onnx) == 1:
            return OnnxFile(onnx[0])
        raise ArtifactError(f"{p} is neither a run dir (plan.json), a slim dir (config.json) nor a folder "
                            "with one .onnx file")
    if p.is_file() and p.suffix == ".json":
        return PlanFile(p)
    if p.exists():
        raise ArtifactError(f"{p} is not a model artifact (expected a run dir, a slim dir, an .onnx file or a plan)")
    if os.sep in text or "/" in text or p.suffix:
        raise ArtifactError(f"not found: {text}")
    return TimmName(text)


def resolve(source: str | os.PathLike, accept: Iterable[str] = KINDS, what: str = "SOURCE") -> Artifact:
    """`detect(source)`, refused with one line if its kind is not in `accept`."""
    accept = tuple(accept)
    art = detect(source)
    if art.kind not in accept:
        wanted = " or ".join(_NAMES[k] for k in accept)
        raise ArtifactError(f"{what} {os.fspath(source)} is {_NAMES[art.kind]}; expected {wanted}")
    return art


def run_dir(path: str | os.PathLike, what: str = "RUN_DIR") -> RunDir:
    """A run dir, or a one-line error naming what `path` is instead."""
    art = resolve(path, ("run",), what)
    assert isinstance(art, RunDir)
    return art


def slim_dir(path: str | os.PathLike, what: str = "SLIM_DIR") -> SlimDir:
    """A slim dir, or a one-line error naming what `path` is instead."""
    art = resolve(path, ("slim",), what)
    assert isinstance(art, SlimDir)
    return art
