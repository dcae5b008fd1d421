"""Serving with the real tritonserver (bundled by `bash scripts/setup.sh --serve`; no mocks).

Fast tests: address/port validation, load-failure parsing, CLI one-line errors.
Slow tests: a dense and a slim demo-architecture model served side by side (python backend):
parity with ONNX Runtime over HTTP and gRPC, dynamic batching, the bad-request matrix, the
`serve` and `bench --server` commands, clean shutdown, the production config's one-line failure;
lifetime (started from a worker thread, owner SIGKILLed), supervision (the two requests of death
sent past the front, restarts, give-up), the soak test through the front, broken repositories,
the config sweep.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from p3b_deploy.cli import main as cli_main
from p3b_deploy.errors import ServeError
from p3b_deploy.serve import (TritonServer, check_loopback, check_port, find_runtime, infer, load_failure,
                              model_info, parse_address)
from p3b_deploy.export.triton import config_from_onnx, write_triton_repo

from onnx_models import tiny_image_onnx  # noqa: E402

MAX_BATCH = 8


# ------------------------------------------------------------------------------ fast: validation
def test_busy_and_invalid_ports_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        busy = s.getsockname()[1]
        with pytest.raises(ServeError, match=f"HTTP port {busy} is busy on 127.0.0.1"):
            check_port(busy, "HTTP port")
    for bad in (-1, 70000, "8000"):
        with pytest.raises(ServeError, match="must be an integer in 1..65535"):
            check_port(bad)
    assert 0 < check_port(0) <= 65535


def test_only_loopback_addresses():
    assert parse_address("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert parse_address("[::1]:9") == ("::1", 9) and parse_address("localhost:8001") == ("localhost", 8001)
    assert check_loopback("127.0.0.2") == "127.0.0.2"
    for addr in ("10.0.0.1:8001", "0.0.0.0:8001", "example.com:8001", "[2001:db8::1]:8001", "192.168.1.2:80"):
        with pytest.raises(ServeError, match="only loopback servers are allowed"):
            parse_address(addr)
    for addr, msg in (("127.0.0.1", "HOST:PORT"), ("127.0.0.1:x", "port must be"), ("127.0.0.1:0", "port must be")):
        with pytest.raises(ServeError, match=msg):
            parse_address(addr)


def test_load_failure_is_one_line():
    log = ('I1202 model_lifecycle.cc:472] "loading: prod:1"\n'
           'E1202 model_lifecycle.cc:642] "failed to load \'prod\' version 1: Invalid argument: unable to find '
           'backend library for backend \'onnxruntime\', try specifying runtime on the model configuration."\n'
           'error: creating server: Internal - failed to load all models\n')
    why = load_failure(log)
    assert "\n" not in why and why.startswith("model 'prod' failed to load: Invalid argument: unable to find backend")
    assert "--triton-backend python" in why
    assert load_failure("error: creating server: Address already in use\n") == "creating server: Address already in use"
    assert load_failure("nothing here") is None


def test_load_failures_keep_the_reason_and_drop_the_traceback(tmp_path):
    """Log lines as tritonserver 2.51 writes them (copied from real runs)."""
    corrupt = ('E1202 model_lifecycle.cc:642] "failed to load \'m\' version 1: Internal: InvalidProtobuf: '
               '[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from /r/m/1/model.onnx failed:Protobuf parsing '
               'failed.\\n\\nAt:\\n  /venv/onnxruntime_inference_collection.py(753): _create_inference_session\\n'
               '  /r/m/1/model.py(26): initialize\\n"\nerror: creating server: Internal - failed to load all models\n')
    assert load_failure(corrupt) == ("model 'm' failed to load: Internal: InvalidProtobuf: [ONNXRuntimeError] : 7 : "
                                     "INVALID_PROTOBUF : Load model from /r/m/1/model.onnx failed:Protobuf parsing "
                                     "failed. (at /r/m/1/model.py line 26)")
    raising = ('E1202 model_lifecycle.cc:642] "failed to load \'m\' version 1: Internal: RuntimeError: boom\\n\\nAt:\\n'
               '  /r/m/1/model.py(2): <module>\\n  <frozen importlib._bootstrap>(241): _call_with_frames_removed\\n"\n')
    assert load_failure(raising) == "model 'm' failed to load: Internal: RuntimeError: boom (at /r/m/1/model.py line 2)"
    no_version = ('E1202 model_repository_manager.cc:724] "failed to load model \'m\': at least one version must be '
                  'available under the version policy of model \'m\'"\nerror: creating server: Internal - failed to '
                  'load all models\n')
    assert load_failure(no_version) == ("model 'm' failed to load: at least one version must be available under the "
                                        "version policy of model 'm' (a model needs a version folder with the model "
                                        "in it, e.g. <model>/1/)")
    cfg = tmp_path / "config.pbtxt"
    cfg.write_text('name: "m"\nbackend: "python"\nmax_batch_size: 8 }}\n')
    bad_pbtxt = f'E1202 model_repository_manager.cc:1460] "Poll failed for model directory \'m\': failed to read text ' \
                f'proto from {cfg}"\nerror: creating server: Internal - failed to load all models\n'
    assert load_failure(bad_pbtxt) == (f"model 'm' failed to load: failed to read text proto from {cfg}: 3:19 : "
                                       "'max_batch_size: 8 }}': Expected identifier or number, got }.")


def _cli(capsys, *argv) -> tuple[int, str]:
    code = cli_main(list(argv))
    return code, capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, err = _cli(capsys, "bench", "--server", "10.1.2.3:8001", "--models", "a", "--report", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and "only loopback servers are allowed" in err
    code, err = _cli(capsys, "bench", "--server", "127.0.0.1:8001", "--report", str(tmp_path / "r"))
    assert code == 2 and "--server needs --models" in err
    free = check_port(0)  # nobody listens there: the client's own error, in one line
    code, err = _cli(capsys, "bench", "--server", f"127.0.0.1:{free}", "--models", "a", "--report", str(tmp_path / "r"))
    assert code == 2 and err.count("\n") == 1 and f"model 'a' on 127.0.0.1:{free}: failed to connect" in err
    assert not (tmp_path / "r").exists()
    code, err = _cli(capsys, "bench", "--report", str(tmp_path / "r"))
    assert code == 2 and "give at least one MODEL" in err
    code, err = _cli(capsys, "serve", str(tmp_path / "missing"))
    assert code == 2 and err == f"error: model repository not found: {tmp_path / 'missing'}\n"
    (tmp_path / "empty").mkdir()
    code, err = _cli(capsys, "serve", str(tmp_path / "empty"))
    assert code == 2 and "no models in" in err and err.count("\n") == 1
    repo = tmp_path / "repo"
    src = tiny_image_onnx(tmp_path / "m.onnx")
    write_triton_repo(src, repo, config_from_onnx(src, "m", backend="python"))
    code, err = _cli(capsys, "serve", str(repo), "--http-port", "8123", "--grpc-port", "8123")
    assert code == 2 and "ports must differ" in err
    code, err = _cli(capsys, "serve", str(repo), "--tritonserver", str(tmp_path / "nope"))
    assert code == 2 and "tritonserver not found or not executable" in err and not list(tmp_path.glob("*.log"))


# ------------------------------------------------------------------------------ slow: a real server
def _runtime_or_skip():
    try:
        return find_runtime()
    except ServeError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> dict[str, Path]:
    """Dense and slim vit_nano_patch4_16 (the demo architecture, re-randomised weights) as ONNX."""
    _runtime_or_skip()
    import timm
    import torch
    from plans import random_plan, randomize_

    import p3b_deploy.models  # noqa: F401  (registers the demo architecture)
    from p3b_deploy.export import export_onnx, metadata_for
    from p3b_deploy.surgery import slim
    from p3b_deploy.models import describe
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("onnx")
    dense = randomize_(timm.create_model("vit_nano_patch4_16", pretrained=False).eval(), seed=0)
    small = slim(dense, random_plan(describe(dense), seed=3, keep=0.5, remove_prob=0.1), residual_io="index")
    fast = dict(input_size=(3, 16, 16), profile_runs=1, threads=1, agreement_images=16, verify_batches=(1,))
    out = {}
    for name, model in (("dense", dense), ("slim", small)):
        export_onnx(model, d / f"{name}.onnx", metadata=metadata_for(model, name), **fast)
        out[name] = d / f"{name}.onnx"
    return out


def _repo(models: dict[str, Path], repo: Path, backend: str = "python") -> Path:
    for name, path in models.items():
        # a 5 ms batching window makes the batching test deterministic on a busy 2-core machine
        write_triton_repo(path, repo, config_from_onnx(path, name, backend=backend, max_batch_size=MAX_BATCH,
                                                       max_queue_delay_us=5000, intra_op_threads=1))
    return repo


@pytest.fixture(scope="module")
def server(onnx_models, tmp_path_factory):
    repo = _repo(onnx_models, tmp_path_factory.mktemp("serve") / "repo")
    with TritonServer(repo, log_path=repo.parent / "server.log") as s:
        yield s
    assert s.process is None


@pytest.fixture(scope="module")
def ort_sessions(onnx_models):
    from p3b_deploy.onnx_io import load_onnx_session
    return {name: load_onnx_session(path, threads=1)[0] for name, path in onnx_models.items()}


def _x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def _ort(sess, x: np.ndarray) -> np.ndarray:
    return sess.run(["logits"], {"images": x})[0]


@pytest.mark.slow
def test_served_logits_equal_onnxruntime(server, ort_sessions):
    assert server.models == ["dense", "slim"]
    worst = 0.0
    for name, sess in ort_sessions.items():
        for n in (1, 3, MAX_BATCH):
            x = _x(n, seed=n)
            ref = _ort(sess, x)
            for protocol, address in (("grpc", server.grpc_address), ("http", server.http_url)):
                got = infer(address, name, x, protocol=protocol)
                assert got.shape == (n, 10) and got.dtype == np.float32
                worst = max(worst, float(np.abs(got - ref).max()))
    assert worst <= 1e-5
    x = _x(4, seed=9)  # the two served models really are different models
    assert np.abs(infer(server.grpc_address, "dense", x) - infer(server.grpc_address, "slim", x)).max() > 1e-2


@pytest.mark.slow
def test_preprocessing_metadata_is_served(server):
    info = model_info(server.grpc_address, "slim")
    assert (info.input_name, info.output_name, info.input_dims, info.max_batch_size) == \
        ("images", "logits", (3, 16, 16), MAX_BATCH)
    assert info.parameters["input_size"] == "[3, 16, 16]" and info.parameters["mean"] == "[0.5, 0.5, 0.5]"
    assert 0.0 < float(info.parameters["prune_ratio"]) < 1.0 and info.parameters["source_model"] == "slim"


@pytest.mark.slow
def test_dynamic_batching_across_concurrent_requests(server, ort_sessions):
    before = server.statistics("dense")
    n = 16
    xs = [_x(1, seed=100 + i) for i in range(n)]
    got: list = [None] * n
    start = threading.Barrier(n)

    def one(i: int) -> None:
        start.wait()
        got[i] = infer(server.grpc_address, "dense", xs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    after = server.statistics("dense")
    inferences = after["inference_count"] - before["inference_count"]
    executions = after["execution_count"] - before["execution_count"]
    assert inferences == n and executions < n  # requests were batched together server-side
    ref = _ort(ort_sessions["dense"], np.concatenate(xs))
    assert np.abs(np.concatenate(got) - ref).max() <= 1e-5  # and split back to the right caller


def _raw_grpc(server, model: str, x: np.ndarray, name: str = "images", datatype: str = "FP32"):
    import tritonclient.grpc as tc
    client = tc.InferenceServerClient(server.grpc_address)
    try:
        inp = tc.InferInput(name, list(x.shape), datatype)
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp]).as_numpy("logits")
    finally:
        client.close()


@pytest.mark.slow
def test_bad_requests_get_errors_and_server_stays_up(server, ort_sessions):
    import tritonclient.grpc as tc
    good = _x(2, seed=7)
    ref = _ort(ort_sessions["slim"], good)
    cases = [  # (what, call, expected server message)
        ("wrong input name", lambda: _raw_grpc(server, "slim", good, name="pixels"), "unexpected inference input 'pixels'"),
        ("wrong dtype", lambda: _raw_grpc(server, "slim", good.astype(np.float64), datatype="FP64"),
         "data-type is 'FP64', but model 'slim' expects 'FP32'"),
        ("wrong shape", lambda: _raw_grpc(server, "slim", _x(2, 1)[:, :, :8]), "unexpected shape for input 'images'"),
        ("batch above max_batch_size", lambda: _raw_grpc(server, "slim", _x(MAX_BATCH + 1, 2)),
         f"batch-size must be <= {MAX_BATCH} for 'slim'"),
        ("empty batch", lambda: _raw_grpc(server, "slim", np.zeros((0, 3, 16, 16), np.float32)),
         "input byte size mismatch for input 'images'"),
        ("unknown model", lambda: _raw_grpc(server, "nope", good), "'nope'"),
    ]
    for what, call, msg in cases:
        with pytest.raises(tc.InferenceServerException) as e:
            call()
        assert msg in e.value.message(), (what, e.value.message())
        assert server.alive(), what
        assert np.abs(infer(server.grpc_address, "slim", good) - ref).max() <= 1e-5, what  # next request is fine
    with pytest.raises(ServeError) as e:  # the same through our client, HTTP: the front answers
        infer(server.http_url, "slim", _x(1, 3)[:, :2], protocol="http")
    assert str(e.value) == ("model 'slim': input 'images' of model 'slim' has shape [1, 2, 16, 16], "
                            "the model takes [1..8, 3, 16, 16]")
    # NaN in -> NaN out for that image only (documented): images of a batch never mix in a ViT
    x = _x(3, seed=8)
    x[1, 0, 3, 3] = np.nan
    out = infer(server.grpc_address, "slim", x)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    assert np.abs(out[[0, 2]] - _ort(ort_sessions["slim"], x[[0, 2]])).max() <= 1e-5
    assert server.alive() and np.abs(infer(server.grpc_address, "slim", good) - ref).max() <= 1e-5


def _group(pgid: int) -> list[str]:
    r = subprocess.run(["pgrep", "-g", str(pgid)], capture_output=True, text=True)
    return r.stdout.split()


@pytest.mark.slow
def test_clean_shutdown_leaves_no_process(onnx_models, tmp_path):
    repo = _repo(onnx_models, tmp_path / "repo")
    s = TritonServer(repo).start()
    pgid = s.process.pid
    members = _group(pgid)
    assert len(members) == 3  # the server and one python backend stub per model
    assert s.stop() == 0
    assert _group(pgid) == [] and not any(Path(f"/proc/{p}").exists() for p in members)
    assert s.stop() is None  # stopping twice is harmless


@pytest.mark.slow
def test_production_config_fails_only_for_missing_backend(onnx_models, tmp_path, capsys):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc
    repo = _repo(onnx_models, tmp_path / "repo", backend="onnxruntime")
    cfg = text_format.Parse((repo / "slim" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.backend == "onnxruntime" and cfg.max_batch_size == MAX_BATCH
    log = tmp_path / "server.log"
    with pytest.raises(ServeError) as e:
        TritonServer(repo, log_path=log).start()
    msg = str(e.value)
    assert "\n" not in msg and msg.endswith(f"(server log: {log})") and "failed to load" in log.read_text()
    reasons = msg.split("; ")  # the server stops at the first failure or lists both (load order varies)
    assert {r.split(":")[0] for r in reasons} <= {"model 'dense' failed to load", "model 'slim' failed to load"}
    assert all("unable to find backend library for backend 'onnxruntime'" in r for r in reasons)
    code, err = _cli(capsys, "serve", str(repo), "--http-port", "0", "--grpc-port", "0", "--log", str(log))
    assert code == 2 and err.count("\n") == 1 and "unable to find backend library for backend 'onnxruntime'" in err


def _serve_cli(repo: Path, *args: str) -> tuple[subprocess.Popen, str]:
    """`p3b-deploy serve REPO` in a subprocess; returns it and its gRPC address once it is ready."""
    proc = subprocess.Popen([sys.executable, "-m", "p3b_deploy", "serve", str(repo), "--http-port", "0",
                             "--grpc-port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    grpc = None
    for line in proc.stdout:
        if line.strip().startswith("gRPC"):
            grpc = line.split()[1]
        if line.startswith("Ctrl-C"):
            return proc, grpc
    raise AssertionError(f"serve did not come up: {proc.wait(30)} {proc.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_cli_and_bench_server(onnx_models, tmp_path, sig):
    import json
    repo = _repo(onnx_models, tmp_path / "repo")
    proc, grpc = _serve_cli(repo)
    try:
        host, port = parse_address(grpc)
        assert host == "127.0.0.1"
        if sig == signal.SIGINT:  # once is enough: the benchmark through the running `serve`
            code = cli_main(["bench", "--server", grpc, "--models", "dense,slim", "--concurrency", "1,4",
                             "--max-seconds", "0.6", "--max-requests", "300", "--report", str(tmp_path / "rep")])
            assert code == 0
            assert {f.name for f in (tmp_path / "rep").iterdir()} >= {"report.json", "report.md", "report.csv",
                                                                      "latency.png"}
            rep = json.loads((tmp_path / "rep" / "report.json").read_text())
            rows = {(r["model"], r["concurrency"]): r for r in rep["results"]}
            assert set(rows) == {("dense", 1), ("slim", 1), ("dense", 4), ("slim", 4)}
            for r in rows.values():
                assert 0 < r["median_ms"] <= r["p90_ms"] <= r["p99_ms"] and r["throughput"] > 0
                assert 1 <= r["requests"] <= 300 and r["timed_s"] < 3.0  # bounded in count and time
            assert rows[("dense", 1)]["speedup"] == 1.0 and rows[("slim", 4)]["speedup"] > 0
            assert rep["system"]["server"]["version"] == "2.51.0"
            assert "| slim | 4 |" in (tmp_path / "rep" / "report.md").read_text()
    finally:
        proc.send_signal(sig)
        code = proc.wait(60)
    assert code == 0 and "stopped" in proc.stdout.read()
    time.sleep(0.5)
    left = subprocess.run(["pgrep", "-f", str(repo)], capture_output=True, text=True).stdout.split()
    assert left == []  # neither the server nor a stub outlived `serve`


@pytest.mark.slow
def test_serve_check_for_the_pipeline(onnx_models, tmp_path):
    from p3b_deploy.serve import serve_check
    check = serve_check(onnx_models, tmp_path / "serve", concurrency=(1, 4), rounds=3, max_seconds=0.3,
                        max_requests=200)
    assert max(check.parity.values()) <= 1e-5 and set(check.parity) == {"dense", "slim"}
    assert check.concurrency == 4 and all(v > 0 for v in check.throughput.values())
    assert (check.report_dir / "report.md").is_file() and (check.repo / "slim" / "1" / "model.py").is_file()
    r = check.ratio["slim"]
    assert check.rounds == 3 and len(r["per_round"]) == 3 and r["min"] <= r["median"] <= r["max"]
    assert sorted(r["per_round"])[1] == r["median"] and check.ratio["dense"]["per_round"] == [1.0] * 3
    rows = {(x["model"], x["concurrency"]): x for x in check.report.results}
    assert len(rows) == 4 and all(x["rounds"] == 3 and x["requests"] <= 3 * 200 for x in rows.values())
    row = check.summary_row()
    assert row.startswith("| served img/s, p99 (Triton gRPC, concurrency 4, median of 3 rounds) |")
    assert f"median of 3 rounds, range {r['min']:.2f}-{r['max']:.2f}x" in row


def test_run_serve_switch_and_summary_row():
    from p3b_deploy.cli import build_parser
    from p3b_deploy.cli.run import resolve
    from p3b_deploy.serve.check import serving_row
    assert resolve(build_parser().parse_args(["run"])).serve is False  # opt-in
    assert resolve(build_parser().parse_args(["run", "--serve"])).serve is True
    check = {"concurrency": 4, "throughput": {"dense": 100.0, "slim": 150.0}, "p99_ms": {"dense": 20.0, "slim": 12.5},
             "parity": {"dense": 0.0, "slim": 2e-7}, "rounds": 5,
             "ratio": {"slim": {"median": 1.5, "min": 1.25, "max": 1.75}}}
    assert serving_row(check) == ("| served img/s, p99 (Triton gRPC, concurrency 4, median of 5 rounds) | 100.0, "
                                  "20.0 ms | 150.0, 12.5 ms | 1.50x faster (median of 5 rounds, range 1.25-1.75x); "
                                  "parity vs ORT 2.0e-07 |")
    check["ratio"]["slim"] = {"median": 0.8, "min": 0.5, "max": 1.25}  # below 1 is slower, never "0.80x faster"
    assert serving_row(check).endswith("| 0.80x, i.e. 1.25x slower (median of 5 rounds, range 0.50-1.25x, "
                                       "within noise); parity vs ORT 2.0e-07 |")
    del check["ratio"], check["rounds"]  # a summary written before rounds existed
    assert "| 1.50x faster; parity" in serving_row(check)


def test_rounds_combine_into_medians_and_paired_ratios():
    from types import SimpleNamespace

    from p3b_deploy.serve.check import combine_rounds

    def row(model, thr, p99, batch):
        return {"model": model, "concurrency": 4, "throughput": thr, "median_ms": p99 / 2, "p90_ms": p99, "p95_ms": p99,
                "p99_ms": p99, "mean_ms": p99 / 2, "min_ms": 1.0, "server_batch": batch, "requests": 10, "images": 20,
                "timed_s": 0.5, "iters": 10, "mac_reduction": 2.0 if model == "slim" else 1.0}
    rounds = [SimpleNamespace(results=[row("dense", d, 40.0 + i, 2.0), row("slim", s_, 20.0 + i, 3.0)])
              for i, (d, s_) in enumerate([(100.0, 150.0), (50.0, 100.0), (200.0, 160.0)])]
    rows, ratios = combine_rounds(rounds, "dense")
    by = {r["model"]: r for r in rows}
    assert ratios[("slim", 4)] == [1.5, 2.0, 0.8] and ratios[("dense", 4)] == [1.0, 1.0, 1.0]
    s = by["slim"]
    assert (s["throughput"], s["throughput_min"], s["throughput_max"]) == (150.0, 100.0, 160.0)
    assert (s["speedup"], s["speedup_min"], s["speedup_max"], s["speedup_efficiency"]) == (1.5, 0.8, 2.0, 0.75)
    assert (s["p99_ms"], s["requests"], s["images"], s["timed_s"], s["rounds"]) == (21.0, 30, 60, 1.5, 3)
    assert by["dense"]["throughput"] == 100.0 and by["dense"]["speedup"] == 1.0


def test_serving_path_imports_no_torch():
    """serve, bench --server and the client run where only numpy/onnxruntime/tritonclient exist."""
    code = ("import sys; import p3b_deploy.serve, p3b_deploy.cli.serve, p3b_deploy.cli.bench, p3b_deploy.export.triton; "
            "from p3b_deploy.serve import client, check, server, runtime; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------------------ slow: lifetime, supervision
_OWNER = """
import sys, time
from concurrent.futures import ThreadPoolExecutor
from p3b_deploy.serve import TritonServer
with ThreadPoolExecutor(1) as pool:  # started from a worker thread that ends right away
    s = pool.submit(lambda: TritonServer(sys.argv[1]).start()).result()
print(s.process.pid, flush=True)
time.sleep(600)
"""


def _gone_within(pgid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not _group(pgid)


@pytest.mark.slow
def test_server_started_from_a_thread_lives_with_its_process(onnx_models, tmp_path):
    from concurrent.futures import ThreadPoolExecutor
    repo = _repo(onnx_models, tmp_path / "repo")
    with ThreadPoolExecutor(1) as pool:
        s = pool.submit(lambda: TritonServer(repo).start()).result()
    try:  # the thread that started it has ended: the server must not care
        time.sleep(1.5)
        assert s.alive() and infer(s.grpc_address, "slim", _x(1, 0)).shape == (1, 10)
    finally:
        assert s.stop() == 0
    # ... and it dies with the process that owns it, even when that process is SIGKILLed
    owner = subprocess.Popen([sys.executable, "-c", _OWNER, str(repo)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    pgid = int(owner.stdout.readline())
    time.sleep(1.0)
    assert len(_group(pgid)) == 3
    owner.kill()
    owner.wait(10)
    assert _gone_within(pgid, 20)


def _post(port: int, path: str, body: bytes, headers: dict | None = None) -> tuple[int | str, bytes]:
    import http.client
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    except (ConnectionError, http.client.HTTPException) as e:
        return type(e).__name__, b""
    finally:
        c.close()


HUGE_SHAPE = json.dumps({"inputs": [{"name": "images", "shape": [2147483647, 1, 16, 16], "datatype": "FP32",
                                     "data": [0.0] * 256}]}).encode()
NESTED = b"[" * (8 << 20)


def _grpc_huge_shape(s: TritonServer) -> str:
    """The huge-shape request over gRPC (raw protobuf: tritonclient would check the shape first)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    with grpc.insecure_channel(s.grpc_address, options=[("grpc.enable_http_proxy", 0)]) as ch:
        req = service_pb2.ModelInferRequest(model_name="slim")
        inp = req.inputs.add(name="images", datatype="FP32")
        inp.shape.extend([2147483647, 1, 16, 16])
        req.raw_input_contents.append(b"\0" * 1024)
        with pytest.raises(grpc.RpcError) as e:
            service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return e.value.details()


def _wait_restarts(s: TritonServer, n: int, seconds: float) -> float:
    t0 = time.monotonic()
    while s.restarts < n and time.monotonic() - t0 < seconds:
        time.sleep(0.05)
    assert s.restarts == n, (s.events, s.log()[-2000:])
    return time.monotonic() - t0


@pytest.mark.slow
def test_requests_of_death_crash_bare_triton_and_the_supervisor_restarts_it(onnx_models, tmp_path):
    """The two requests really kill tritonserver 2.51 when they reach it (sent here to its internal
    port, bypassing the front); the supervisor says why and brings it back on the same ports."""
    repo = _repo(onnx_models, tmp_path / "repo")
    with TritonServer(repo, restart=True, max_restarts=2, backoff_s=0.2, log_path=tmp_path / "s.log") as s:
        ports = (s.http_port, s.grpc_port, s.upstream_http_port)
        for body, signame, n in ((HUGE_SHAPE, "signal 6 (SIGABRT)", 1), (NESTED, "signal 11 (SIGSEGV)", 2)):
            pid = s.process.pid
            assert _post(s.upstream_http_port, "/v2/models/slim/infer", body)[0] == "RemoteDisconnected"
            assert _wait_restarts(s, n, 30) < 10
            assert s.process.pid != pid and (s.http_port, s.grpc_port, s.upstream_http_port) == ports
            assert s.deaths[-1].startswith(f"killed by {signame}; last log line: ")
            assert f"tritonserver died (killed by {signame}; last log line:" in s.events[-2]
            assert infer(s.http_url, "slim", _x(2, 1), protocol="http").shape == (2, 10)
        os.kill(s.process.pid, signal.SIGKILL)  # a third death in a row: max_restarts=2 gives up
        assert s.wait() == -9 and s.gave_up.startswith("killed by signal 9 (SIGKILL)")
        assert s.events[-1].endswith("giving up after 2 restart(s) in a row") and not s.alive()


@pytest.mark.slow
def test_no_request_of_death_soak(onnx_models, ort_sessions, tmp_path):
    """~20 s of normal traffic (4 clients, HTTP and gRPC) with the crashing and other bad requests
    in between, all through the served ports: bad ones get 4xx, normal ones their exact logits,
    and the first server process is still the one serving."""
    repo = _repo(onnx_models, tmp_path / "repo")
    xs = [_x(n, seed=50 + n) for n in (1, 3)]
    refs = {(m, i): _ort(ort_sessions[m], x) for m in ("dense", "slim") for i, x in enumerate(xs)}
    bad = [  # (what, body, headers[, path])
        ("huge declared shape", HUGE_SHAPE, {"Content-Type": "application/json"}),
        ("8 MB nested JSON", NESTED, {}),
        ("8 MB junk, no JSON type", os.urandom(8 << 20), {"Content-Type": "application/octet-stream"}),
        ("body over the limit", b"x" * ((64 << 20) + 1), {}),
        ("gzip body", b"\x1f\x8b" + b"\x00" * 64, {"Content-Encoding": "gzip"}),
        ("header length past the body", b'{"inputs": []}', {"Inference-Header-Content-Length": "99"}),
        ("huge shape, odd path", HUGE_SHAPE, {"Content-Type": "application/json"}, "/v2/models/slim/infer/"),
    ]
    with TritonServer(repo, restart=True, backoff_s=0.2) as s:
        first = s.process.pid
        stop_at = time.monotonic() + 20
        ok, failed, bad_status = [], [], []

        def normal(k: int) -> None:
            i = 0
            while time.monotonic() < stop_at:
                m, j = ("dense", "slim")[i % 2], (i + k) % 2
                protocol, address = (("grpc", s.grpc_address), ("http", s.http_url))[(i + k) % 2]
                try:
                    got = infer(address, m, xs[j], protocol=protocol, timeout_s=30)
                    (ok if np.abs(got - refs[(m, j)]).max() <= 1e-5 else failed).append(m)
                except ServeError as e:
                    failed.append(str(e))
                i += 1

        threads = [threading.Thread(target=normal, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        rounds = 0
        while time.monotonic() < stop_at - 2:
            for what, body, headers, *path in bad:
                status, answer = _post(s.http_port, (path or ["/v2/models/slim/infer"])[0], body, headers)
                bad_status.append((what, status))
                assert isinstance(status, int) and 400 <= status < 500 and b'"error"' in answer, (what, status)
            rounds += 1
        assert "batch-size must be <= 8" in _grpc_huge_shape(s)  # over gRPC, Triton's own check holds
        for t in threads:
            t.join(60)
        assert rounds >= 2 and len(bad_status) == rounds * len(bad)
        assert len(ok) >= 100 and len(ok) >= 0.99 * (len(ok) + len(failed)), failed[:3]
        assert s.process.pid == first and s.restarts == 0 and s.alive()
        assert s.front.counts["rejected"] == len(bad_status)


@pytest.mark.slow
def test_slow_clients_are_cut_off_by_the_real_serve_front(onnx_models, ort_sessions, tmp_path):
    """The slow-client storm of test_front.py against the real server's front (2 s deadlines):
    200 trickled heads and 50 trickled bodies all get 408 within 2 + 5 s, HTTP infer requests
    meanwhile get their exact logits, and the process's thread count is back to idle after."""
    from p3b_deploy.serve import FrontConfig
    from slow_clients import normal_requests, settle, storm
    x = _x(1, seed=7)
    body = json.dumps({"inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    ref = _ort(ort_sessions["dense"], x)
    limits = FrontConfig(header_timeout_s=2.0, body_timeout_s=2.0, idle_timeout_s=2.0, max_connections=300)
    with TritonServer(_repo(onnx_models, tmp_path / "repo"), front=limits) as s:
        idle = threading.active_count()
        stop, answers = threading.Event(), []
        worker = threading.Thread(target=normal_requests, args=(s.http_port, stop, answers, body,
                                                                "/v2/models/dense/infer"))
        worker.start()
        try:
            result = storm(s.http_port, heads=200, bodies=50, trickle_s=0.5, limit_s=10.0)
        finally:
            stop.set()
            worker.join(30)
        assert result.open_at_end == 0 and all(c.answer.startswith(b"HTTP/1.1 408 ") for c in result.clients)
        lifetimes = result.lifetimes("head") + result.lifetimes("body")
        assert len(lifetimes) == 250 and 1.95 <= min(lifetimes) and max(lifetimes) <= 7.0, (min(lifetimes),
                                                                                             max(lifetimes))
        assert len(answers) >= 5 and all(isinstance(a, tuple) and a[0] == 200 for a in answers), answers[:3]
        for _, raw in answers:
            got = np.array(json.loads(raw)["outputs"][0]["data"], dtype=np.float32).reshape(ref.shape)
            assert np.abs(got - ref).max() <= 1e-5
        assert s.front.counts["timed_out"] == 250 and s.alive()
        assert settle(threading.active_count, idle, 5.0) == idle and s.front.open_connections == 0


def _tritonserver_child(pid: int) -> int:
    out = subprocess.run(["pgrep", "-P", str(pid), "-x", "tritonserver"], capture_output=True, text=True).stdout.split()
    assert len(out) == 1, out
    return int(out[0])


@pytest.mark.slow
def test_serve_cli_restarts_then_gives_up_in_one_line(onnx_models, tmp_path):
    repo = _repo(onnx_models, tmp_path / "repo")
    proc, grpc = _serve_cli(repo, "--max-restarts", "1", "--log", str(tmp_path / "s.log"))
    try:
        first = _tritonserver_child(proc.pid)
        os.kill(first, signal.SIGSEGV)
        died = proc.stderr.readline()
        assert died.startswith("serve: tritonserver died (killed by signal 11 (SIGSEGV); last log line: ") \
            and died.rstrip().endswith("); restart 1/1 in 1.0s"), died
        assert proc.stderr.readline().startswith("serve: tritonserver restarted (pid ")
        assert infer(grpc, "slim", _x(1, 0)).shape == (1, 10)  # same address as before
        os.kill(_tritonserver_child(proc.pid), signal.SIGABRT)
        assert proc.wait(60) == 1
        err = proc.stderr.read().splitlines()
        assert err[0].startswith("serve: tritonserver died (killed by signal 6 (SIGABRT)") and \
            err[0].endswith("giving up after 1 restart(s) in a row")
        assert len(err) == 2 and err[1].startswith("error: tritonserver died 2 time(s), gave up after 1 restart(s); "
                                                   "last: killed by signal 6 (SIGABRT); last log line: ")
        assert err[1].endswith(f"(log: {tmp_path / 's.log'})")
    finally:
        proc.kill()
        proc.wait()



@pytest.mark.slow
def test_serve_says_why_a_model_does_not_load(onnx_models, tmp_path, capsys):
    """Four broken repositories, each through `serve`: exit 2, one line, the server's reason."""
    import shutil
    cases = {  # what -> (break it, expected in the line)
        "corrupt model.onnx": (lambda m: (m / "1" / "model.onnx").write_bytes(b"not onnx"),
                               "INVALID_PROTOBUF : Load model from {m}/1/model.onnx failed:Protobuf parsing failed. "
                               "(at {m}/1/model.py line "),
        "config.pbtxt syntax": (lambda m: (m / "config.pbtxt").write_text((m / "config.pbtxt").read_text()
                                                                          .replace("max_batch_size: 8", "max_batch_size: 8 }")),
                                "failed to read text proto from {m}/config.pbtxt: 3:"),
        "no version folder": (lambda m: shutil.rmtree(m / "1"), "at least one version must be available"),
        "failing model.py": (lambda m: (m / "1" / "model.py").write_text("import numpy\n\n\nraise RuntimeError('no GPU here')\n"),
                             "Internal: RuntimeError: no GPU here (at {m}/1/model.py line 4)"),
    }
    for i, (what, (breaks, expect)) in enumerate(cases.items()):
        repo = _repo(onnx_models, tmp_path / f"repo{i}")
        breaks(repo / "slim")
        code, err = _cli(capsys, "serve", str(repo), "--http-port", "0", "--grpc-port", "0",
                         "--log", str(tmp_path / f"{i}.log"))
        assert code == 2 and err.count("\n") == 1 and err.startswith("error: model 'slim' failed to load: "), (what, err)
        assert expect.format(m=repo / "slim") in err, (what, err)
        assert "At:" not in err and "Traceback" not in err and "\\n" not in err, (what, err)


@pytest.mark.slow
def test_config_sweep_reloads_models_and_writes_the_best_back(onnx_models, ort_sessions, tmp_path, capsys, server):
    from p3b_deploy.serve.tune import ModelLoader, settings_of
    code, err = _cli(capsys, "bench", "--server", server.grpc_address, "--models", "slim", "--sweep", "instances=2",
                     "--report", str(tmp_path / "no"))  # a server without explicit model control
    assert code == 2 and err.count("\n") == 1 and "cannot reload model 'slim' with another config" in err
    assert "--model-control explicit" in err
    repo = _repo(onnx_models, tmp_path / "repo")
    with TritonServer(repo, instances=2, threads=1) as s:  # serve --instances 2 --threads 1
        loader = ModelLoader(s.grpc_address)
        assert [settings_of(loader.config(m)) for m in ("dense", "slim")] == [{"instances": 2, "threads": 1}] * 2
        deadline = time.monotonic() + 15  # the first instances' stubs exit a moment after the reload
        while len(_group(s.process.pid)) != 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_group(s.process.pid)) == 5  # the server and two stubs per model
        x = _x(3, 5)
        assert np.abs(infer(s.grpc_address, "slim", x) - _ort(ort_sessions["slim"], x)).max() <= 1e-5
        loader.close()
        code, out = cli_main(["bench", "--server", s.grpc_address, "--models", "dense,slim", "--sweep",
                              "instances=1,2", "threads=1", "--concurrency", "2", "--max-seconds", "0.3",
                              "--p99-ms", "10000", "--write-back", str(repo), "--report", str(tmp_path / "sw")]), \
            capsys.readouterr().out
        assert code == 0
        rep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
        assert {(r["model"], r["instances"], r["threads"]) for r in rep["rows"]} == \
            {(m, i, 1) for m in ("dense", "slim") for i in (1, 2)}
        for m in ("dense", "slim"):
            best = rep["best"][m]
            assert best["throughput"] == max(r["throughput"] for r in rep["rows"] if r["model"] == m)
            assert f"{m}: best instances {best['instances']}, threads 1" in out
            text = (repo / m / "config.pbtxt").read_text()
            assert f"count: {best['instances']}" in text and 'string_value: "1"' in text
            loader = ModelLoader(s.grpc_address)  # the best config is what the server runs now
            assert settings_of(loader.config(m)) == {"instances": best["instances"], "threads": 1}
            loader.close()
        assert "**best**" in (tmp_path / "sw" / "sweep.md").read_text()
