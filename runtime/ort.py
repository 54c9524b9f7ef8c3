"""ONNX Runtime sessions and safetensors weights, as both sides load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import BundleError


def make_session(path: Path, *, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types for missing/corrupt graphs
        raise BundleError(f"{path}: cannot load graph ({str(e).splitlines()[0]})") from None


def read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise BundleError(f"{path}: unreadable weights ({e})") from None
