"""A probe pack's probes for targets that run no ONNX file: ExecuTorch .pte and LiteRT .tflite.

ExecuTorch and LiteRT lower from torch, so the pack's probe modules are rebuilt from its manifest
(`latency_pack.probes_from_manifest`: same seeds, same graphs as the ONNX files) and each is
lowered with the writer the target's export uses: `executorch_pte.write_pte` (XNNPACK fp32, or
PT2E static int8 for `executorch-int8`) and `litert_tflite.convert` (fp32, or int8 static on the
transformer branches for `litert-int8`, whose patch embedding and head stay float as in the
export). int8 probes are calibrated on seeded random inputs of the probe's shape: the timing does
not depend on the scales. The null probe (no linear layer) stays fp32, as on the ONNX int8 targets.

Files go to `<pack>/<variant>/<label>.b<batch>.<pte|tflite>` (variant: pte, pte-int8, tflite,
tflite-int8), written atomically, and are reused while newer than the pack's manifest. The batch
is static (ExecuTorch: a fixed-batch program, faster to lower; LiteRT: one `b<batch>` signature).
Lowering runs in this process, one probe after the other, behind a progress bar with an ETA.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..bench.latency_table import LatencyTableError, manifest_build, pack_models, read_manifest
from ..errors import P3BError
from ..io import atomic_path
from ..targets import Target

SUFFIX = {"executorch": ".pte", "litert": ".tflite"}
CALIBRATION_SAMPLES = 8  # seeded random inputs per int8 probe


@dataclass
class LoweredProbes:
    """The probe files of one edge target at one batch size."""
    files: dict[str, str]  # label -> .pte / .tflite path (labels of `pack_models`)
    lowered: list[str]  # labels lowered by this call (the rest were reused)
    seconds: float  # wall time of rebuilding + lowering (0 when everything was reused)


def probe_paths(pack: str | os.PathLike, target: Target, batch: int) -> dict[str, Path]:
    """label -> where the target's lowered probe lives (`<pack>/<variant>/<label>.b<batch><suffix>`)."""
    if target.runtime not in SUFFIX:
        raise LatencyTableError(f"target {target.name} runs ONNX files: its probes are the pack's own")
    out = Path(pack) / target.variant
    return {label: out / f"{label}.b{int(batch)}{SUFFIX[target.runtime]}" for label in pack_models(pack)}


def stale(pack: str | os.PathLike, target: Target, batch: int) -> list[str]:
    """Labels whose lowered file is missing or older than the pack's manifest."""
    made = (Path(pack) / "manifest.json").stat().st_mtime
    return [label for label, p in probe_paths(pack, target, batch).items()
            if not p.is_file() or p.stat().st_mtime < made]


def lowering_unavailable(target: Target) -> str | None:
    """Why probes cannot be lowered for `target` here (its converter is missing), or None."""
    if target.runtime == "executorch":
        from ..executorch_io import unavailable
        reason = unavailable()
        if reason is None and target.int8:
            import importlib.util
            if importlib.util.find_spec("torchao") is None:
                reason = "int8 lowering needs torchao (XNNPACK's PT2E quantizer): run `bash scripts/setup_edge.sh`"
        return reason
    from ..litert_io import converter_unavailable
    return converter_unavailable()


def lower_probe(module: Any, example: Any, target: Target, label: str, batch: int, path: Path) -> None:
    """Write one probe lowered for `target` at a static `batch` to `path` (the export's writers)."""
    import torch
    size = tuple(int(s) for s in example.shape[1:])
    calib = None
    # null: no linear layer, timed as it is; LiteRT int8 keeps the patch embedding and head float
    if target.int8 and label != "null" and not (target.runtime == "litert" and label == "fixed"):
        calib = torch.randn(CALIBRATION_SAMPLES, *size, generator=torch.Generator().manual_seed(0))
    if target.runtime == "executorch":
        from .executorch_pte import write_pte
        write_pte(module, path, size, int(batch), False, {"purpose": "latency probe", "label": label},
                  calibration=calib)
    else:
        from .litert_tflite import convert
        path.write_bytes(convert(module, size, [int(batch)], calibration=calib))


Lowering = Callable[[Any, Any, Target, str, int, Path], None]


def lower_probes(pack: str | os.PathLike, target: Target, batch: int, lower: Lowering | None = None,
                 progress: bool = True) -> LoweredProbes:
    """Every probe of `pack` as `target` runs it, lowering the missing or stale ones (`lower`:
    default `lower_probe`; tests pass a stand-in). Refuses in one line, before any work, a pack
    made before its manifest could rebuild the probes, or a converter missing here."""
    pack = Path(pack)
    paths = probe_paths(pack, target, batch)
    todo = stale(pack, target, batch)
    if not todo:
        return LoweredProbes(files={k: str(v) for k, v in paths.items()}, lowered=[], seconds=0.0)
    manifest = read_manifest(pack)
    manifest_build(manifest, f"probe pack {pack}")  # an old pack is refused before any check or work
    if lower is None:
        reason = lowering_unavailable(target)
        if reason:
            raise LatencyTableError(f"target {target.name}: cannot lower the probes here: {reason}")
        lower = lower_probe
    from ..progress import progress_bar
    from .latency_pack import probes_from_manifest
    t0 = time.perf_counter()
    try:
        probes = probes_from_manifest(manifest, f"probe pack {pack}").modules
    except P3BError as e:
        raise LatencyTableError(str(e)) from None
    bar = progress_bar(len(todo), desc=f"lowering probes for {target.name}", unit="probe") if progress else None
    for label in todo:
        module, example = probes[label]
        if bar is not None:
            bar.set_postfix(probe=label)
        with atomic_path(paths[label]) as tmp:
            lower(module, example, target, label, batch, tmp)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return LoweredProbes(files={k: str(v) for k, v in paths.items()}, lowered=todo,
                         seconds=round(time.perf_counter() - t0, 1))
