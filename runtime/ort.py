"""ONNX Runtime sessions and safetensors weights, as both sides load them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from .bundle import BundleError, readable

# The size of this process's shared ONNX Runtime thread pool once it has one (0: ORT's default, one per core).
_shared_threads: int | None = None


def share_threads(threads: int | None) -> None:
    """Run every ONNX Runtime session this process makes from now on in one pool of `threads` threads (None: one per core).

    A cloud holds a session per segment kind, or per segment when prepacked; with a pool of N threads each, they
    start N threads per session, which spin for the same cores (on 2 cores, `--threads 2` decoded 13 times slower
    than one thread). ORT allows one shared pool per process, made once and for good: every later session joins
    it, whatever it asks for, and a second call must ask for the same size.
    """
    global _shared_threads
    size = threads or 0
    if _shared_threads == size:
        return
    if _shared_threads is not None:
        have = _shared_threads or "one per core"
        raise ValueError(f"this process already runs ONNX Runtime on a shared pool of {have} threads; it cannot take "
                         f"{threads or 'one per core'}")
    ort.set_global_thread_pool_sizes(size, 1)
    _shared_threads = size


def _options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if _shared_threads is not None:
        options.use_per_session_threads = False  # ORT refuses a session with a pool of its own once the shared one exists
    elif threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spin:  # a session's own pool only: the shared pool's threads spin as ORT made them
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def _graph_error(path: Path, error: Exception) -> BundleError:
    """What to tell the user when the graph at `path` will not load: only a fresh split makes a graph again, unless it
    is there and only this user may not read it."""
    if not Path(path).is_file():
        return BundleError(f"{path}: missing; split the checkpoint again")
    try:
        readable(path)
    except BundleError as unreadable:
        return unreadable
    reason = " ".join(str(error).split()) or type(error).__name__
    return BundleError(f"{path}: not a valid ONNX graph ({reason}); split the checkpoint again")


def _load_graph(path: Path):
    """The ONNX model at `path`, read with onnx (which the edge does not need: imported here, not above)."""
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as e:  # protobuf's DecodeError for a damaged file, OSError, onnx's own checks
        raise _graph_error(path, e) from None


Feeds = dict[str, tuple[int, ...] | None]  # what a graph will be fed: each input's name, and its shape where fixed


def check_inputs(path: Path, declared: dict[str, list], feeds: Feeds) -> None:
    """Refuse a graph that does not take what it will be fed (`declared`: its inputs' names and dimensions, None or a
    name where free). A graph of another split (another rank, files swapped) would fail only at its first call."""
    if set(declared) != set(feeds):
        differ = sorted(set(declared) ^ set(feeds))[:3]
        raise BundleError(f"{path}: the graph's inputs are not those its bundle feeds it ({', '.join(differ)} differ); "
                          "split the checkpoint again")
    for name, shape in feeds.items():
        dims = declared[name]
        fixed_differ = any(isinstance(d, int) and d != n for d, n in zip(dims, shape or ()))
        if shape is not None and (len(dims) != len(shape) or fixed_differ):
            raise BundleError(f"{path}: the graph takes {name} of shape {list(dims)}, its bundle's is {list(shape)}; "
                              "split the checkpoint again")


def make_session(path: Path, *, threads: int | None = None, spin: bool = True,
                 feeds: Feeds | None = None) -> ort.InferenceSession:
    """An ORT session on the CPU; with `spin` false, its pool's threads sleep as soon as a call is done. With
    `feeds`, refused unless the graph takes exactly those (check_inputs)."""
    try:
        session = ort.InferenceSession(str(path), _options(threads, spin), providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own exception types (InvalidProtobuf, Fail, NoSuchFile, ...)
        raise _graph_error(path, e) from None
    if feeds is not None:
        check_inputs(path, {i.name: i.shape for i in session.get_inputs()}, feeds)
    return session


class BoundSession:
    """The graph at `path` with some of its inputs fixed to `weights`: run it with the other inputs only.

    The weights become initializers that ONNX Runtime takes from our arrays
    without copying them, so it can prepack the matrices of its MatMuls once,
    at load. Fed as inputs, they are packed again on every call with more than
    one row, which costs a multi-row call several times a one-row call; packed,
    rows share one pass over the weights. The packed copies take about as
    much memory as the weights themselves.
    """

    def __init__(self, path: Path, weights: dict[str, np.ndarray], *, inputs: list[str], threads: int | None = None):
        """`inputs` are the graph's other inputs, by name: it is refused unless it takes those and `weights`."""
        from onnx import TensorProto, helper

        model = _load_graph(path)
        graph = model.graph
        declared = {i.name: [d.dim_value if d.HasField("dim_value") else None for d in i.type.tensor_type.shape.dim]
                    for i in graph.input}
        check_inputs(path, declared, {**dict.fromkeys(inputs), **{n: w.shape for n, w in weights.items()}})
        fed = [i for i in graph.input if i.name not in weights]
        del graph.input[:]
        graph.input.extend(fed)
        for name, value in weights.items():
            # A placeholder that says "external data": ORT takes the data from add_external_initializers.
            tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=value.shape,
                                 data_location=TensorProto.EXTERNAL)
            tensor.external_data.add(key="location", value="bound-at-load")
            graph.initializer.append(tensor)
        options = _options(threads)
        # ORT keeps pointers into these arrays; holding the values keeps them alive as long as the session.
        self._values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in weights.values()]
        options.add_external_initializers(list(weights), self._values)
        try:
            self.session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise _graph_error(path, e) from None

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(outputs, feed)


def read_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    readable(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise BundleError(f"{path}: unreadable weights ({e})") from None
