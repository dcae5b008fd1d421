"""Triton python-backend model that serves `model.onnx` (next to this file) with ONNX Runtime.

Written into `REPO/<name>/1/model.py` by p3b-deploy for servers without the onnxruntime backend
(e.g. the tritonserver bundled in the `nvidia-pytriton` wheel). It runs inside Triton's python
backend stub, which needs numpy < 2 and onnxruntime in the Python it starts with.
Input/output names come from config.pbtxt, so this file is the same for every model.
"""
import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        opts = ort.SessionOptions()
        # 0 = ORT default (all cores); set `intra_op_threads` so several instances do not oversubscribe.
        opts.intra_op_num_threads = int(params.get("intra_op_threads", "0") or 0)
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        # The dynamic batcher hands over several requests at once: run them as one ORT batch
        # (that is where batching pays off), then split the logits back per request.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        sizes = [a.shape[0] for a in arrays]
        try:
            batch = np.ascontiguousarray(np.concatenate(arrays).astype(np.float32, copy=False))
            logits = self.session.run([self.output_name], {self.input_name: batch})[0]
        except Exception as e:  # one bad batch must not take the model down: answer each request
            error = pb_utils.TritonError(f"onnxruntime failed: {e}".splitlines()[0])
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        chunks = np.split(logits, np.cumsum(sizes)[:-1])
        return [pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, np.ascontiguousarray(c))])
                for c in chunks]
