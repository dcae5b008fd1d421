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
