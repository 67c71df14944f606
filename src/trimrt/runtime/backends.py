"""Backends: one small interface (activate / infer / deactivate), like polygraphy's runners.

ONNX Runtime runs every build on CPU (custom ops are inlined from their functions).
OpenVINO runs the same model.onnx on its CPU plugin (trimrt[openvino]), the functions
inlined before it reads the graph. TensorRT runs `model.engine` when TensorRT and a GPU
are present. OpenVINO and TensorRT are imported lazily, so the runtime imports without them.
"""

from __future__ import annotations

import abc
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import BackendUnavailableError, SessionClosedError
from .feeds import TensorInfo

#: OnnxRuntimeBackend's optimization -> ONNX Runtime's GraphOptimizationLevel
_ORT_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
               "all": "ORT_ENABLE_ALL"}


class Backend(abc.ABC):
    """A loaded model that runs feeds: `activate` loads it, `infer` runs it (safe to call
    from several threads), `deactivate` frees it; `inputs` / `outputs` are set once active."""

    name = "base"
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    #: runs with buffers that are an input and an output at once (infer_in_place)
    in_place = False

    @abc.abstractmethod
    def activate(self) -> None: ...

    @abc.abstractmethod
    def infer(self, feeds: Mapping[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]: ...

    def deactivate(self) -> None:
        pass


def exact_u8s8() -> bool:
    """Whether ONNX Runtime's u8 × s8 integer kernels are exact on this CPU: an x86 CPU with
    VNNI (AVX512-VNNI or AVX-VNNI: vpdpbusd adds the products in int32). Without VNNI they add
    pairs of products in saturating int16 (vpmaddubsw); other CPUs are not assumed either way."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            flags = next((line.split(":", 1)[1].split() for line in info if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


#: a model larger than this is run as stored: serializing it again would pass protobuf's 2 GB limit
_SIGNED_INT8_MAX_BYTES = 1_500_000_000


def signed_int8_model(path: str | Path) -> tuple[bytes, int] | None:
    """The model at `path` with its MatMulInteger weights stored as uint8 codes with zero point
    128 (quantization/encodings.int8_dynamic: ONNX Runtime's U8U8 kernels, exact on every x86
    CPU) stored as int8 codes with zero point 0: the same integer products, but ONNX Runtime
    then runs its U8S8 kernels, ~1.3× faster on VNNI CPUs (use where `exact_u8s8`). Returns
    (serialized model, weights converted), or None when there is nothing to convert or the model
    is too large to serialize again. The build's file is left as it is."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    external = {entry.value for init in model.graph.initializer for entry in init.external_data
                if entry.key == "location"}
    if path.stat().st_size + sum((path.parent / name).stat().st_size for name in external) > _SIGNED_INT8_MAX_BYTES:
        return None
    inits = {init.name: init for init in model.graph.initializer}
    uses: dict[str, list[tuple[object, int]]] = {}
    for node in _nodes_within(model.graph):  # If / Loop branches read the graph's initializers too
        for slot, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, slot))

    def candidate(node) -> bool:
        w, zp = (node.input[1], node.input[3]) if len(node.input) == 4 else ("", "")
        return (node.op_type == "MatMulInteger" and w in inits and zp in inits
                and inits[w].data_type == inits[zp].data_type == onnx.TensorProto.UINT8)

    nodes = [node for node in model.graph.node if candidate(node)]
    if not nodes:
        return None
    if external:
        onnx.load_external_data_for_model(model, str(path.parent))
    nodes = [node for node in nodes if np.all(numpy_helper.to_array(inits[node.input[3]]) == 128)]
    # a weight or zero point changes type only if every node reading it converts, in the same slot
    while True:
        chosen = {id(node) for node in nodes}
        kept = [node for node in nodes if all(id(user) in chosen and slot == want for want in (1, 3)
                                              for user, slot in uses[node.input[want]])]
        if len(kept) == len(nodes):
            break
        nodes = kept
    for name in {node.input[1] for node in nodes}:
        codes = numpy_helper.to_array(inits[name]).astype(np.int16) - 128
        inits[name].CopyFrom(numpy_helper.from_array(codes.astype(np.int8), name))
    for name in {node.input[3] for node in nodes}:
        inits[name].CopyFrom(numpy_helper.from_array(np.zeros(numpy_helper.to_array(inits[name]).shape, np.int8),
                                                     name))
    converted = len(nodes)
    return (model.SerializeToString(), converted) if converted else None


def _nodes_within(graph):
    """Every node of `graph` and of the subgraphs its nodes hold (If / Loop / Scan bodies)."""
    from onnx import AttributeProto

    for node in graph.node:
        yield node
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.type == AttributeProto.GRAPH else \
                list(attribute.graphs) if attribute.type == AttributeProto.GRAPHS else []
            for body in bodies:
                yield from _nodes_within(body)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    in_place = True

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None,
                 optimization: str = "all", providers: list[str] | None = None, spinning: bool = True,
                 disabled_optimizers: Sequence[str] = (), memory_arena: bool = True, shapes_first: bool = False,
                 signed_int8: bool = False):
        # a path, or the serialized model itself
        self.model = model if isinstance(model, bytes) else str(model)
        # run uint8 MatMulInteger weights (zero point 128) as int8 where that is exact and faster
        # (signed_int8_model); the count converted, once active
        self.signed_int8 = signed_int8
        self.signed_int8_weights = 0
        self.threads = threads
        self.optimization = optimization
        self.providers = providers or ["CPUExecutionProvider"]
        # ORT's intra-op threads spin after each run; two sessions alternating in one process
        # (bench) then fight for the cores, so timing turns them off
        self.spinning = spinning
        # ONNX Runtime graph optimizers a build asks to skip (its manifest's "onnxruntime" entry)
        self.disabled_optimizers = list(disabled_optimizers)
        # ORT's CPU arena keeps the peak of every run for the session's life: the compiler's
        # check sessions (several alive at once, on long inputs) give it back after each run
        self.memory_arena = memory_arena
        # ORT's priority-based order runs Shape / Size nodes as soon as their input exists, so a
        # value read only for its shape is freed at once (the default order may run them last)
        self.shapes_first = shapes_first
        self._session = None

    def activate(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        if not self.spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _ORT_LEVELS[self.optimization])
        opts.enable_cpu_mem_arena = self.memory_arena
        if self.shapes_first:
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        opts.log_severity_level = 3  # errors reach the caller as exceptions; warnings (an input with a default) are noise
        model = self.model
        if self.signed_int8 and isinstance(model, str) and exact_u8s8():
            converted = signed_int8_model(model)
            if converted is not None:
                model, self.signed_int8_weights = converted
        self._session = ort.InferenceSession(model, opts, providers=self.providers,
                                             disabled_optimizers=self.disabled_optimizers or None)
        # a failing run is raised to the caller (as a typed error by Session); ORT's own log line
        # of it on stderr would only repeat it
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4
        # no graph capture (a CPU session has none): said outright, the IO-binding run does not
        # look the entry up through a raised exception each step (~70 µs)
        self._run_options.add_run_config_entry("gpu_graph_id", "-1")
        self.inputs = [TensorInfo.from_ort(a) for a in self._session.get_inputs()] + \
            [TensorInfo.from_ort(a, optional=True) for a in self._session.get_overridable_initializers()]
        self.outputs = [TensorInfo.from_ort(a) for a in self._session.get_outputs()]
        self._defaulted = {i.name for i in self.inputs if i.optional}

    def infer(self, feeds, output_names=None):
        # InferenceSession.run is thread-safe: one session serves concurrent callers
        session = self._session
        if session is None:
            raise SessionClosedError("this ONNX Runtime session is closed; load the build again")
        names = output_names or [o.name for o in self.outputs]
        try:
            return dict(zip(names, session.run(names, dict(feeds), self._run_options)))
        except Exception as exc:  # noqa: BLE001 - ORT raises its own types
            if not one_row_at_a_time(exc):
                raise
        rows = [session.run(names, row_feeds(feeds, r), self._run_options) for r in range(_batch(feeds))]
        return {name: np.concatenate([row[i] for row in rows]) for i, name in enumerate(names)}

    def infer_in_place(self, feeds: Mapping[str, np.ndarray], buffers: Mapping[str, tuple[str, object]],
                       output_names: list[str], state: dict | None = None) -> dict[str, np.ndarray]:
        """Run with `buffers` {input name: (output name, OrtValue)}: each buffer is fed as the input
        and receives the output, which the graph writes in place (a decoder's KV cache: ONNX
        Runtime GenAI's past_present_share_buffer); returns `output_names` (not buffers).
        `state`: a dict the caller keeps while the buffers stay the same, where the binding of
        the buffers is kept from one call to the next (a decode step then binds its feeds only)."""
        session = self._session
        if session is None:
            raise SessionClosedError("this ONNX Runtime session is closed; load the build again")
        binding = (state or {}).get("binding")
        # bound anew when the inputs fed change too: an input bound before and not fed now must go
        if binding is None or state.get("session") is not session or state.get("fed") != set(feeds):
            binding = session.io_binding()
            for name in output_names:  # bound first: get_outputs() lists them in this order
                binding.bind_output(name)
            for name, (output, value) in buffers.items():
                binding.bind_ortvalue_input(name, value)
                binding.bind_ortvalue_output(output, value)
            if state is not None:
                state.update(binding=binding, session=session, fed=set(feeds))
        else:
            for name in output_names:  # a fresh output each run (the last one was returned)
                binding.bind_output(name)
        import onnxruntime as ort

        held = []  # an overridable initializer (an input with a default) binds only as an OrtValue
        for name, value in feeds.items():
            value = np.ascontiguousarray(value)
            if name in self._defaulted:
                held.append(ort.OrtValue.ortvalue_from_numpy(value))  # holds the array until the run is done
                binding.bind_ortvalue_input(name, held[-1])
            else:
                binding.bind_cpu_input(name, value)
        session.run_with_iobinding(binding, self._run_options)
        outputs = binding.get_outputs_as_ortvaluevector()  # the raw vector: no wrapper per cache buffer
        return {name: outputs[i].numpy() for i, name in enumerate(output_names)}

    def deactivate(self) -> None:
        self._session = None


class OpenVINOBackend(Backend):
    """Runs a build on OpenVINO's CPU plugin: its ONNX graph, converted here (see
    `openvino_model`), or the OpenVINO IR the build stores (an .xml path). A compiled model
    serves every thread; an infer request does not, so each calling thread gets its own."""

    name = "openvino"
    #: performance hint (a recipe's [openvino] performance_hint) -> OpenVINO's PERFORMANCE_HINT
    HINTS = {"latency": "LATENCY", "throughput": "THROUGHPUT"}

    def __init__(self, model: str | Path | bytes, *, threads: int | None = None, precision: str = "f32",
                 hint: str = "latency", shapes: Mapping[str, Sequence[int]] | None = None):
        self.model = model if isinstance(model, bytes) else str(model)
        self.threads, self.precision, self.hint = threads, precision, hint
        #: input name -> the static shape to compile for (None or empty: the model's own, dynamic)
        self.shapes = {name: list(dims) for name, dims in (shapes or {}).items()}
        self._compiled = None
        self._defaults: dict[str, np.ndarray] = {}  # inputs OpenVINO would freeze: fed when not given
        self._local = threading.local()

    @staticmethod
    def available() -> bool:
        import importlib.util

        return importlib.util.find_spec("openvino") is not None

    def activate(self) -> None:
        if not self.available():
            raise BackendUnavailableError("the openvino backend needs OpenVINO: pip install 'trimrt[openvino]'")
        if self.hint not in self.HINTS:
            raise BackendUnavailableError(f"unknown OpenVINO performance hint {self.hint!r}; choose one of "
                                          f"{list(self.HINTS)}")
        import openvino as ov

        core = ov.Core()
        missing = missing_precision(core, self.precision)
        if missing:
            raise BackendUnavailableError(missing)
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": self.HINTS[self.hint]}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        is_ir = isinstance(self.model, str) and self.model.endswith(".xml")
        model = core.read_model(self.model) if is_ir else openvino_model(self.model, core)
        # compiling may give a port more names (of values merged into it): the model's own are the ONNX names
        names = {name for port in [*model.inputs, *model.outputs] for name in port.get_names()}
        self._defaults = _input_defaults(model)
        if self.shapes:
            fix_shapes(model, self.shapes)
        self._compiled = core.compile_model(model, "CPU", config)
        self.inputs = [_ov_info(port, names, self._defaults) for port in self._compiled.inputs]
        self.outputs = [_ov_info(port, names) for port in self._compiled.outputs]

    def infer(self, feeds, output_names=None):
        compiled = self._compiled
        if compiled is None:
            raise SessionClosedError("this OpenVINO session is closed; load the build again")
        request = getattr(self._local, "request", None)
        if request is None or self._local.compiled is not compiled:
            request = self._local.request = compiled.create_infer_request()
            self._local.compiled = compiled
        # share_inputs: OpenVINO reads the arrays in place (the run is synchronous), no copy of a long past
        fed = {**{k: v for k, v in self._defaults.items() if k not in feeds}, **feeds}
        results = request.infer({name: np.ascontiguousarray(value) for name, value in fed.items()}, share_inputs=True)
        by_name = {info.name: results[i] for i, info in enumerate(self.outputs)}  # OVDict: by output index
        names = output_names or [o.name for o in self.outputs]
        # copies: the request reuses its output memory on its next run
        return {name: np.array(by_name[name]) for name in names}

    def deactivate(self) -> None:
        self._compiled = None


def fix_shapes(model, shapes: Mapping[str, Sequence[int]]) -> None:
    """Give the inputs of an OpenVINO model the static `shapes` (name -> dims), in place;
    BackendUnavailableError, one line, for a name the model lacks, a rank or a fixed size it
    contradicts, or shapes its graph cannot take (OpenVINO's reason)."""
    import openvino as ov

    ports = {name: port for port in model.inputs for name in port.get_names()}
    for name, dims in shapes.items():
        if name not in ports:
            raise BackendUnavailableError(f"shapes names {name!r}, which is not an input of the model "
                                          f"(its inputs: {sorted(p.get_any_name() for p in model.inputs)})")
        own = ports[name].get_partial_shape()
        if not own.compatible(ov.PartialShape(list(dims))):
            raise BackendUnavailableError(f"shapes gives {name} the shape {list(dims)}, which its shape "
                                          f"{own} does not allow")
    try:
        model.reshape({ports[name]: ov.PartialShape(list(dims)) for name, dims in shapes.items()})
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise BackendUnavailableError(f"shapes {dict(shapes)} do not fit the model: {first[:200]}") from None


def missing_precision(core, precision: str) -> str | None:
    """Why this CPU cannot run OpenVINO at inference `precision` (None: it can)."""
    from ..recipe import OPENVINO_PRECISIONS

    if precision not in OPENVINO_PRECISIONS:
        return f"unknown OpenVINO inference precision {precision!r}; choose one of {list(OPENVINO_PRECISIONS)}"
    capability = OPENVINO_PRECISIONS[precision]
    if capability not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return (f"this CPU has no {precision} support in OpenVINO (its OPTIMIZATION_CAPABILITIES lack {capability}); "
                'build with [openvino] inference_precision = "f32"')
    return None


def openvino_model(model: str | Path | bytes, core=None):
    """A build's ONNX graph (a path or its bytes) as an OpenVINO model: trimrt's custom ops
    inlined into their decompositions (OpenVINO's ONNX front end does not expand model-local
    functions of a custom domain), every TopK stable (ONNX breaks ties by the lower index,
    OpenVINO only when stable), and each input and output named by its ONNX name alone."""
    import onnx
    import onnx.inliner
    import openvino as ov

    proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model))
    if proto.functions:
        _spell_out_default_attributes(proto)
        proto = onnx.inliner.inline_local_functions(proto)
    defaults = _free_defaulted_inputs(proto)
    converted = (core or ov.Core()).read_model(proto.SerializeToString())
    for name, array in defaults.items():  # kept in the model (and its IR): the backend feeds them when not given
        text = f"{array.dtype.name};{','.join(map(str, array.shape))};{','.join(map(repr, array.ravel().tolist()))}"
        converted.set_rt_info(text, [_DEFAULTS, name])
    for op in converted.get_ops():
        if op.get_type_name() == "TopK":
            op.set_attribute("stable", True)
    _select_in_index_order(converted)
    # a port may carry several tensor names (a graph output that is also an inner value)
    onnx_names = {v.name for v in [*proto.graph.input, *proto.graph.output]}
    for port in [*converted.inputs, *converted.outputs]:
        names = sorted(port.get_names() & onnx_names)
        if names:
            port.get_tensor().set_names({names[0]})
    return converted


def _select_in_index_order(model) -> int:
    """Rewrite each "top k, then their positions ascending" TopK pair without a stable sort.

    The selection ops keep the k best of a span in their original order: a TopK by value
    whose indices only feed a TopK (smallest first, the same k) sorting them. ONNX breaks
    ties by the lower index, which on OpenVINO needs its stable sort: 185 µs for 204 of 255
    scores, against 10 µs for this exact form (most of what pruning added to a MiniLM layer
    at batch 1): t = the k-th best value (an unstable TopK: values are the same either way);
    keep every score better than t and, of those equal to t, the first ones up to k; then
    the k smallest of (position if kept, else position + N), unique keys, so unstable too.
    Returns the number of pairs rewritten."""
    import openvino.opset13 as ops

    rewritten = 0
    for sort in [op for op in model.get_ops() if op.get_type_name() == "TopK"]:
        source = sort.input_value(0)
        select = source.get_node()
        attrs = sort.get_attributes()
        if (select.get_type_name() != "TopK" or source.get_index() != 1 or attrs["mode"] != "min"
                or attrs["sort"] != "value" or attrs["axis"] != select.get_attributes()["axis"]
                or len(source.get_target_inputs()) != 1 or sort.output(1).get_target_inputs()
                or not _same_value(sort.input_value(1), select.input_value(1))):
            continue
        scores, k = select.input_value(0), ops.convert(select.input_value(1), "i64")
        largest = select.get_attributes()["mode"] == "max"
        rank = scores.get_partial_shape().rank
        if rank.is_dynamic:
            continue
        axis = attrs["axis"] % rank.get_length()
        ax = ops.constant(np.array([axis], dtype=np.int64))
        values = ops.topk(scores, k, axis, "max" if largest else "min", "none", "i64").output(0)
        kth = (ops.reduce_min if largest else ops.reduce_max)(values, ax, True)
        better = (ops.greater if largest else ops.less)(scores, kth)
        tie = ops.equal(scores, kth)
        room = ops.subtract(k, ops.reduce_sum(ops.convert(better, "i64"), ax, True))
        first_ties = ops.less_equal(ops.cumsum(ops.convert(tie, "i64"), ops.constant(np.int64(axis))), room)
        keep = ops.logical_or(better, ops.logical_and(tie, first_ties))
        n = ops.gather(ops.shape_of(scores, "i64"), ax, ops.constant(np.int64(0)))
        along = [1] * rank.get_length()
        along[axis] = -1
        position = ops.reshape(ops.range(ops.constant(np.int64(0)), ops.squeeze(n, ops.constant([0])),
                                         ops.constant(np.int64(1)), "i64"),
                               ops.constant(np.array(along, dtype=np.int64)), False)
        key = ops.select(keep, position, ops.add(position, n))
        kept = ops.topk(key, k, axis, "min", "value", "i64").output(0)
        if kept.get_element_type() != sort.get_output_element_type(0):
            kept = ops.convert(kept, sort.get_output_element_type(0)).output(0)
        sort.output(0).replace(kept)
        rewritten += 1
    if rewritten:
        model.validate_nodes_and_infer_types()
    return rewritten


def _same_value(a, b, depth: int = 4) -> bool:
    """True when OpenVINO outputs a and b surely hold the same value: the same output, equal
    constants, or the same op with the same attributes on the same inputs (`depth` levels:
    the ONNX front end gives each TopK its own Squeeze of a shared k)."""
    if a == b:
        return True
    na, nb = a.get_node(), b.get_node()
    kind = na.get_type_name()
    if kind != nb.get_type_name() or a.get_index() != b.get_index():
        return False
    if kind == "Constant":
        return bool(np.array_equal(na.get_data(), nb.get_data()) and na.get_element_type() == nb.get_element_type())
    if depth == 0 or na.get_attributes() != nb.get_attributes() or na.get_input_size() != nb.get_input_size():
        return False
    return all(_same_value(x, y, depth - 1) for x, y in zip(na.input_values(), nb.input_values()))


#: rt_info key of the inputs with a default (an ONNX input that is also an initializer)
_DEFAULTS = "trimrt_input_defaults"
#: larger defaults stay constants (OpenVINO freezes an initializer-backed input)
_MAX_DEFAULT_SIZE = 4096


def _free_defaulted_inputs(proto) -> dict[str, np.ndarray]:
    """Make the graph inputs that have a default (an initializer of the same name, such as a
    decoder's attention_bias) plain inputs, which OpenVINO's front end would otherwise freeze
    as constants; returns {name: default} of those made so."""
    from onnx import numpy_helper

    inputs = {v.name for v in proto.graph.input}
    freed = {}
    for init in list(proto.graph.initializer):
        if init.name in inputs and np.prod(init.dims, dtype=np.int64) <= _MAX_DEFAULT_SIZE:
            freed[init.name] = numpy_helper.to_array(init)
            proto.graph.initializer.remove(init)
    return freed


def _input_defaults(model) -> dict[str, np.ndarray]:
    """{input name: default} recorded by openvino_model in `model`'s rt_info."""
    if not model.has_rt_info([_DEFAULTS]):
        return {}
    out = {}
    for name in model.get_rt_info([_DEFAULTS]).astype(dict):
        dtype, shape, values = str(model.get_rt_info([_DEFAULTS, name]).astype(str)).split(";")
        dims = tuple(int(d) for d in shape.split(",") if d)
        out[name] = np.array([float(v) for v in values.split(",") if v], dtype=dtype).reshape(dims)
    return out


def _spell_out_default_attributes(proto) -> None:
    """Give each call of a model-local function the attributes it leaves at their defaults:
    onnx's inliner leaves a Constant that refers to such an attribute with no value, which
    OpenVINO refuses."""
    defaults = {(f.domain, f.name): f.attribute_proto for f in proto.functions}
    for node in _nodes_within(proto.graph):
        given = {a.name for a in node.attribute}
        node.attribute.extend(default for default in defaults.get((node.domain, node.op_type), ())
                              if default.name not in given)


def _ov_info(port, names: set[str], defaults: Mapping[str, np.ndarray] = {}) -> TensorInfo:  # noqa: B006 - read only
    shape = tuple(d.get_length() if d.is_static else "?" for d in port.get_partial_shape())
    name = next(iter(sorted(port.get_names() & names)), port.get_any_name())
    return TensorInfo(name, np.dtype(port.get_element_type().to_dtype()), shape, optional=name in defaults)


def one_row_at_a_time(exc: Exception) -> bool:
    """Whether ONNX Runtime refused a batch that it runs one row at a time: GroupQueryAttention
    takes several new tokens on a past for one sequence only (a draft, a chunk of prompt)."""
    return "batch_size must be 1 when sequence_length > 1 and past context is given" in str(exc)


def _batch(feeds: Mapping[str, np.ndarray]) -> int:
    return max(int(np.shape(v)[0]) for v in feeds.values() if np.ndim(v))


def row_feeds(feeds: Mapping[str, np.ndarray], r: int) -> dict[str, np.ndarray]:
    """Row `r` of a batch of feeds (inputs broadcast over the batch, axis 0 of size 1, as they are)."""
    batch = _batch(feeds)
    return {k: v[r:r + 1] if np.ndim(v) and np.shape(v)[0] == batch else v for k, v in feeds.items()}


class TensorRTBackend(Backend):
    """Runs a serialized TensorRT engine (needs tensorrt, torch with CUDA, and a GPU)."""

    name = "tensorrt"

    def __init__(self, engine_path: str | Path):
        self.engine_path = Path(engine_path)
        # one execution context holds the shapes and addresses of a run: runs take turns on it
        self._lock = threading.Lock()
        self._context = None

    @staticmethod
    def available() -> bool:
        try:
            import tensorrt  # noqa: F401
            import torch

            return torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            return False

    def activate(self) -> None:
        if not self.available():
            raise BackendUnavailableError("the tensorrt backend needs TensorRT, torch with CUDA and an NVIDIA GPU; use backend='onnxruntime'")
        import tensorrt as trt

        from ..plugins.tensorrt_glue import register_all

        register_all()
        self._logger = trt.Logger(trt.Logger.WARNING)
        runtime = trt.Runtime(self._logger)
        self._engine = runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = lambda n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        info = lambda n: TensorInfo(n, np.dtype(trt.nptype(self._engine.get_tensor_dtype(n))),  # noqa: E731
                                    tuple(d if d >= 0 else "?" for d in self._engine.get_tensor_shape(n)))
        self.inputs = [info(n) for n in names if is_input(n)]
        self.outputs = [info(n) for n in names if not is_input(n)]

    def infer(self, feeds, output_names=None):
        import torch

        with self._lock:
            if self._context is None:
                raise SessionClosedError("this TensorRT session is closed; load the build again")
            stream = torch.cuda.current_stream()
            ins = {i.name: torch.from_numpy(np.ascontiguousarray(feeds[i.name])).cuda() for i in self.inputs}
            for name, t in ins.items():
                self._context.set_input_shape(name, tuple(t.shape))
            outs = {i.name: torch.empty(tuple(self._context.get_tensor_shape(i.name)), dtype=getattr(torch, i.dtype.name),
                                        device="cuda") for i in self.outputs}
            for name, t in {**ins, **outs}.items():
                self._context.set_tensor_address(name, t.data_ptr())
            self._context.execute_async_v3(stream.cuda_stream)
            stream.synchronize()
        names = output_names or list(outs)
        return {n: outs[n].cpu().numpy() for n in names}

    def deactivate(self) -> None:
        with self._lock:
            self._context = None
            self._engine = None
