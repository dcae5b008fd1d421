"""The format registry: every `--format` choice is one module behind write / verify / describe."""
from __future__ import annotations

import re

import pytest

from p3b_deploy.errors import ExportError
from p3b_deploy.export.config import FORMATS as CLI_CHOICES
from p3b_deploy.export.formats import FORMATS, Format, get_format


def test_every_registered_format_is_one_module_behind_the_interface():
    assert CLI_CHOICES == tuple(FORMATS) and CLI_CHOICES[0] == "onnx"
    suffixes = set()
    for name in FORMATS:
        fmt = get_format(name)
        assert isinstance(fmt, Format) and fmt.name == name
        assert fmt.suffix.startswith(".") and fmt.suffix not in suffixes
        suffixes.add(fmt.suffix)
        for method in ("write", "verify", "describe"):
            assert getattr(type(fmt), method) is not getattr(Format, method), (name, method)
    assert get_format("onnx").unavailable(None) is None  # the ONNX file needs nothing beyond the base install


def test_unknown_format_is_refused_in_one_line():
    assert tuple(FORMATS)[:3] == ("onnx", "openvino", "executorch")
    with pytest.raises(ExportError, match=f"^format must be one of {re.escape(str(tuple(FORMATS)))}, got 'tflite'$"):
        get_format("tflite")
