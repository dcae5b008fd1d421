"""Triton model repository writer: both flavours parse with Triton's own schema and agree on
everything but the backend; several models side by side; bad options refused in one line."""
from __future__ import annotations

import json

import pytest

from p3b_deploy.errors import ExportError
from p3b_deploy.export.triton import PARAMETER_KEYS, config_from_onnx, write_triton_repo
from onnx_models import tiny_image_onnx




META = dict(source_model="tiny", input_size=json.dumps([3, 4, 4]), mean=json.dumps([0.5, 0.5, 0.5]),
            std=json.dumps([0.25, 0.25, 0.25]), num_classes="5", class_names=json.dumps(["a"] * 5),
            prune_ratio="0.500000", quote='say "hi"\\')


def _parse(path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    return text_format.Parse(path.read_text(), mc.ModelConfig())


def test_both_flavours_share_io_batching_and_metadata(tmp_path):
    from tritonclient.grpc import model_config_pb2 as mc
    src = tiny_image_onnx(tmp_path / "m.onnx", **META)
    repo = tmp_path / "repo"
    prod = write_triton_repo(src, repo, config_from_onnx(src, "dense", max_batch_size=8))
    py = write_triton_repo(src, repo, config_from_onnx(src, "slim", backend="python", max_batch_size=8,
                                                       intra_op_threads=2))
    assert sorted(p.name for p in repo.iterdir()) == ["dense", "slim"]  # side by side, one repository
    a, b = _parse(prod / "config.pbtxt"), _parse(py / "config.pbtxt")
    assert (a.backend, b.backend) == ("onnxruntime", "python")
    assert a.default_model_filename == "model.onnx" and not b.default_model_filename  # python loads model.py
    for c in (a, b):
        assert c.max_batch_size == 8 and c.dynamic_batching.max_queue_delay_microseconds == 100
        assert [(i.name, i.data_type, list(i.dims)) for i in c.input] == [("images", mc.TYPE_FP32, [3, 4, 4])]
        assert [(o.name, o.data_type, list(o.dims)) for o in c.output] == [("logits", mc.TYPE_FP32, [5])]
    assert [g.kind for g in a.instance_group] == [mc.ModelInstanceGroup.KIND_AUTO]
    assert [g.kind for g in b.instance_group] == [mc.ModelInstanceGroup.KIND_CPU]
    pa = {k: v.string_value for k, v in a.parameters.items()}
    pb = {k: v.string_value for k, v in b.parameters.items()}
    assert pb.pop("intra_op_threads") == "2" and pa == pb
    # preprocessing metadata travels; long / unknown keys stay in the ONNX file
    assert json.loads(pa["mean"]) == [0.5, 0.5, 0.5] and json.loads(pa["std"]) == [0.25] * 3
    assert pa["input_size"] == "[3, 4, 4]" and pa["prune_ratio"] == "0.500000"
    assert set(pa) <= set(PARAMETER_KEYS) and "class_names" not in pa and "quote" not in pa
    assert (py / "1" / "model.py").read_text().startswith('"""Triton python-backend model')
    assert not (prod / "1" / "model.py").exists()
    assert (py / "1" / "model.onnx").read_bytes() == (prod / "1" / "model.onnx").read_bytes()


def test_parameter_values_are_escaped(tmp_path):
    src = tiny_image_onnx(tmp_path / "m.onnx", source_model='a "quoted" \\ name\nnext line')
    d = write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "m", backend="python"))
    assert _parse(d / "config.pbtxt").parameters["source_model"].string_value == 'a "quoted" \\ name\nnext line'


def test_static_batch_file_gives_max_batch_zero(tmp_path):
    src = tiny_image_onnx(tmp_path / "s.onnx", batch=4)
    c = _parse(write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "s", backend="python")) / "config.pbtxt")
    assert c.max_batch_size == 0 and list(c.input[0].dims) == [4, 3, 4, 4] and not c.HasField("dynamic_batching")


def test_bad_options_refused(tmp_path):
    src = tiny_image_onnx(tmp_path / "m.onnx")
    for kw, msg in ((dict(backend="tensorrt"), "backend must be one of onnxruntime, python"),
                    (dict(max_batch_size=0), "max batch size must be >= 1"),
                    (dict(instance_count=0), "instance count")):
        with pytest.raises(ExportError, match=msg):
            write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "m", **kw))
    with pytest.raises(ExportError, match="may only use"):
        write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "a/b"))
    (tmp_path / "bad.onnx").write_bytes(b"not onnx")
    with pytest.raises(ExportError, match="not a readable ONNX file"):
        config_from_onnx(tmp_path / "bad.onnx", "m")
    assert not (tmp_path / "repo").exists()


def test_instances_and_threads_per_instance(tmp_path):
    src = tiny_image_onnx(tmp_path / "m.onnx")
    py = _parse(write_triton_repo(src, tmp_path / "repo", config_from_onnx(
        src, "py", backend="python", instance_count=2, intra_op_threads=3)) / "config.pbtxt")
    prod = _parse(write_triton_repo(src, tmp_path / "repo", config_from_onnx(
        src, "prod", instance_count=4, intra_op_threads=1)) / "config.pbtxt")
    assert [g.count for g in py.instance_group] == [2] and py.parameters["intra_op_threads"].string_value == "3"
    assert [g.count for g in prod.instance_group] == [4]
    assert prod.parameters["intra_op_thread_count"].string_value == "1"  # the onnxruntime backend's key
    dflt = _parse(write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "d")) / "config.pbtxt")
    assert "intra_op_thread_count" not in dflt.parameters  # 0 = ORT's default: nothing written


def test_export_flags_for_instances_and_threads():
    from p3b_deploy.cli import build_parser
    from p3b_deploy.cli.options import config_overrides
    from p3b_deploy.export import ExportConfig
    from p3b_deploy.cli.export import EXPORT_FLAGS
    args = build_parser().parse_args(["export", "m", "--out", "x.onnx", "--triton-instances", "2", "--triton-threads", "1"])
    cfg = ExportConfig().replace(**config_overrides(args, ExportConfig, only=EXPORT_FLAGS))
    assert (cfg.triton_instances, cfg.triton_threads) == (2, 1)
