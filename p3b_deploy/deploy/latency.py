"""A latency table for one deployment target, made here: the probe pack of the model (torch) timed
as the target runs it (`bench.latency_table.measure_pack`). Used by `prune --target T
--latency-target X` and `run --target T --latency-target X`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..bench.latency_table import LatencyTable, measure_pack, read_manifest
from ..errors import P3BError
from ..targets import Target, get_target

PACK_DIR, TABLE_FILE = "latency_pack", "latency_table.json"


def target_table(model: str, out_dir: str | os.PathLike, target: str | Target, *, img_size: int | None = None,
                 patch_size: int | None = None, num_classes: int | None = None,
                 progress: Any = None) -> tuple[LatencyTable, Path]:
    """OUT/latency_pack/ (made once, reused when present) timed on `target` -> OUT/latency_table.json.
    A table already there for the same target, batch and threads is reused."""
    t = get_target(target).check()
    out = Path(out_dir)
    path = out / TABLE_FILE
    if path.is_file():
        try:
            old = LatencyTable.load(path)
            if (old.target, old.batch, old.threads) == (t.name, t.batch, t.threads):
                return old, path
        except P3BError:
            pass
    pack = out / PACK_DIR
    try:
        read_manifest(pack)
    except P3BError:
        from ..export.latency_pack import make_pack
        if progress:
            progress(f"making the probe pack of {model} in {pack}/")
        make_pack(model, pack, img_size=img_size, patch_size=patch_size, num_classes=num_classes, threads=t.threads)
    if progress:
        progress(f"timing the probe pack on {t.describe()}")
    table = measure_pack(pack, batch=t.batch, threads=t.threads, target=t)
    table.save(path)
    return table, path
