"""The HTTP front's request checks and the supervisor's death reasons, without a server (fast).
The same checks against the real tritonserver (and the crashes they prevent) are in test_serve.py."""
from __future__ import annotations

import json

import pytest

from p3b_deploy.serve.front import InputSpec, Rejected, check_infer, input_specs, parse_json_part
from p3b_deploy.serve.server import exit_reason, last_log_line

SPECS = {"images": InputSpec(dims=(3, 16, 16), max_batch_size=8)}
LIMIT = 64 << 20


def _req(shape, name="images", dtype="FP32", **extra):
    return {"inputs": [{"name": name, "shape": shape, "datatype": dtype, **extra}]}


def _rejected(fn, *args) -> tuple[int, str]:
    with pytest.raises(Rejected) as e:
        fn(*args)
    return e.value.status, str(e.value)


def test_shapes_that_fit_the_config_pass():
    for b in (1, 5, 8):
        check_infer(_req([b, 3, 16, 16]), "slim", SPECS, LIMIT)
    check_infer(_req([2, 7], name="other"), "slim", SPECS, LIMIT)  # unknown input: Triton answers it
    # -1 dims take any size; a model without batch axis takes exactly its dims
    check_infer(_req([4, 99]), "m", {"images": InputSpec((-1,), 4)}, LIMIT)
    check_infer(_req([3, 16, 16]), "m", {"images": InputSpec((3, 16, 16), 0)}, LIMIT)


def test_request_of_death_shape_and_other_bad_shapes_rejected():
    status, why = _rejected(check_infer, _req([2147483647, 1, 16, 16]), "slim", SPECS, LIMIT)
    assert status == 400 and why == ("input 'images' of model 'slim' has shape [2147483647, 1, 16, 16], "
                                     "the model takes [1..8, 3, 16, 16]")
    for shape in ([9, 3, 16, 16], [0, 3, 16, 16], [2, 3, 16], [2, 3, 16, 17], [2, 1, 3, 16, 16]):
        assert _rejected(check_infer, _req(shape), "slim", SPECS, LIMIT)[0] == 400, shape
    for shape in ([-1, 3], [2**31, 1], [1.5, 2], [True], "2,3", [1] * 17):
        status, why = _rejected(check_infer, _req(shape, name="x"), "slim", SPECS, LIMIT)
        assert status == 400 and "shape must be a list of at most 16 integers" in why, shape
    # an unknown input may not declare more bytes than the body limit: 2**28 INT64 = 2 GiB
    status, why = _rejected(check_infer, _req([2**28], name="x", dtype="INT64"), "slim", SPECS, LIMIT)
    assert why == f"input 'x' declares {2**31} bytes, above the limit of {LIMIT}"
    for doc in ([], {"inputs": []}, {"inputs": "x"}, {"inputs": [3]}, {"inputs": [{"shape": [1]}]}, None):
        assert _rejected(check_infer, doc, "slim", SPECS, LIMIT)[0] == 400, doc


def test_json_part_depth_and_header_length():
    assert parse_json_part(b'{"a": [[1]]}', None, 3) == {"a": [[1]]}
    assert _rejected(parse_json_part, b'{"a": [[[1]]]}', None, 3) == (400, "request JSON nests deeper than 3 levels")
    # 8 MB of '[' crashes tritonserver's recursive parser; here it is a 400 in a few ms
    assert _rejected(parse_json_part, b"[" * (8 << 20), None, 32) == (400, "request JSON nests deeper than 32 levels")
    status, why = _rejected(parse_json_part, b"\x00\x01 binary", None, 32)
    assert status == 400 and why.startswith("request body is not valid JSON")
    head = json.dumps(_req([1, 3, 16, 16], parameters={"binary_data_size": 4})).encode()
    body = head + b"\x00\x01\x02\x03"
    assert parse_json_part(body, str(len(head)), 32)["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert _rejected(parse_json_part, body, str(len(body) + 1), 32)[0] == 400
    assert _rejected(parse_json_part, body, "12x", 32)[0] == 400
    assert parse_json_part(b"  ", None, 32) is None  # an empty POST (e.g. repository index) passes


def test_input_specs_from_served_config():
    cfg = {"max_batch_size": 16, "input": [{"name": "images", "data_type": "TYPE_FP32", "dims": ["3", "224", "224"]}]}
    assert input_specs(cfg) == {"images": InputSpec((3, 224, 224), 16)}


def test_death_reasons():
    assert exit_reason(-11) == "killed by signal 11 (SIGSEGV)" and exit_reason(-6) == "killed by signal 6 (SIGABRT)"
    assert exit_reason(1) == "exit code 1" and exit_reason(None) == "still running"
    log = ("I1202 grpc_server.cc] \"Started GRPCInferenceService\"\n"
           "terminate called after throwing an instance of 'std::bad_alloc'\n  what():  std::bad_alloc\n"
           "Signal (6) received.\n 0# 0x000055 in tritonserver\n 1# 0x7F in /lib/libc.so.6\n\n")
    assert last_log_line(log) == "Signal (6) received."
    assert last_log_line("+----+\n| a |\n+----+\n") is None and last_log_line("") is None


# ------------------------------------------------------------------------------ the config sweep (no server)
def test_sweep_grid_and_config_overrides(tmp_path):
    from p3b_deploy.errors import ServeError
    from p3b_deploy.export.triton import config_from_onnx, write_triton_repo
    from p3b_deploy.serve.tune import parse_sweep, settings_of, with_settings, write_back
    from onnx_models import tiny_image_onnx
    assert parse_sweep(["instances=1,2", "threads=1,2,1"]) == {"instances": (1, 2), "threads": (1, 2)}
    assert parse_sweep(["threads=0,4"]) == {"instances": (None,), "threads": (0, 4)}
    for bad, msg in ((["instances=0"], "integers in 1..64"), (["threads=x"], "integers in 0..64"),
                     (["cores=2"], "--sweep takes"), (["instances=1", "instances=2"], "given twice"), ([], "needs")):
        with pytest.raises(ServeError, match=msg):
            parse_sweep(bad)
    served = {"name": "m", "backend": "python", "instance_group": [{"name": "m_0", "kind": "KIND_CPU", "count": 1}],
              "parameters": {"intra_op_threads": {"string_value": "0"}, "macs": {"string_value": "7"}}}
    new = with_settings(served, 2, 3)
    assert settings_of(new) == {"instances": 2, "threads": 3} and settings_of(served) == {"instances": 1, "threads": 0}
    assert new["parameters"]["macs"] == {"string_value": "7"} and served["instance_group"][0]["count"] == 1
    ort = with_settings({"name": "p", "backend": "onnxruntime"}, 4, 2)  # the production flavour's parameter
    assert ort["instance_group"] == [{"kind": "KIND_CPU", "count": 4}]
    assert ort["parameters"] == {"intra_op_thread_count": {"string_value": "2"}}
    src = tiny_image_onnx(tmp_path / "m.onnx")
    write_triton_repo(src, tmp_path / "repo", config_from_onnx(src, "m", backend="python", instance_count=1))
    path = write_back(tmp_path / "repo", "m", 2, 1)
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    assert [g.count for g in cfg.instance_group] == [2] and cfg.parameters["intra_op_threads"].string_value == "1"
    assert list(cfg.input[0].dims) == [3, 4, 4] and cfg.max_batch_size == 32  # the rest as it was
    with pytest.raises(ServeError, match="--write-back takes the repository folder"):
        write_back(tmp_path, "m", 2, 1)


def test_sweep_passes_average_and_the_best_respects_the_p99_bound():
    from p3b_deploy.serve.tune import aggregate_passes, pick_best

    def r(thr, p99, batch=4.0):
        return {"throughput": thr, "p99_ms": p99, "median_ms": p99 / 2, "server_batch": batch, "requests": 10, "macs": 5}
    raw = {("slim", 1, 1, 16): [r(10.0, 900.0), r(12.0, 1100.0)],  # mean 11, worst p99 1100
           ("slim", 2, 1, 16): [r(14.0, 2500.0), r(13.0, 1500.0)],  # mean 13.5, over a 2000 ms bound
           ("slim", 2, 2, 16): [r(9.0, 800.0), r(8.0, 700.0)],
           ("slim", 1, 1, 1): [r(50.0, 10.0), r(50.0, 10.0)]}  # another level: not where the choice is made
    rows = aggregate_passes(raw, 2000.0)
    by = {(x["instances"], x["threads"], x["concurrency"]): x for x in rows}
    assert by[(1, 1, 16)]["throughput"] == 11.0 and by[(1, 1, 16)]["p99_ms"] == 1100.0
    assert by[(1, 1, 16)]["throughput_passes"] == [10.0, 12.0] and by[(1, 1, 16)]["requests"] == 20
    assert by[(2, 1, 16)]["within_bound"] is False and by[(2, 2, 16)]["within_bound"] is True
    best = pick_best(rows, ["slim"], 16)["slim"]
    assert (best["instances"], best["threads"], best["throughput"]) == (1, 1, 11.0)
    assert pick_best(aggregate_passes(raw, None), ["slim"], 16)["slim"]["instances"] == 2  # no bound: 13.5 wins
    assert pick_best(aggregate_passes(raw, 100.0), ["slim"], 16)["slim"] is None  # nothing within 100 ms
