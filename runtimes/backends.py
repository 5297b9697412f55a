"""Graph backends of the device runtime: onnxruntime (default) and the ExecuTorch runtime (.pte), where installed.

A loaded graph is a callable from a list of numpy arrays (in the graph's input order) to a list of numpy arrays;
an ONNX graph with a "buffer" KV cache runs through `OnnxGraph.run_in_place` (runtimes/kv_cache.py).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from mode_edge.errors import UserError


@functools.cache  # once per process: every session after the first reuses the registered arena
def share_one_arena() -> None:
    """Register one CPU arena in onnxruntime's process environment for every session to use.

    Each session otherwise grows its own arena to its largest activations; the graphs of a model run one after another,
    so one arena serves them all. Measured on the demo bundle (3 backbone + 6 expert graphs, 128-token prefill):
    activation memory 92 MB with an arena per session, 22 MB shared, decode time unchanged."""
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)


OWN_PROCESS = False
"""True in a process the device runtime owns: started as the `mode-edge` command (mode_edge/cli.entry) or as a bench
worker; runtimes/run.run then puts its sessions on the global thread pool."""
_global_pool: list[int | None] = []
"""The intra-op thread count of the process's one global onnxruntime thread pool, once `use_global_thread_pool`
has made it."""


def use_global_thread_pool(threads: int | None) -> None:
    """From now on, run every session this process creates on one global onnxruntime thread pool of `threads`
    intra-op threads (None: onnxruntime's default, one per physical core), whatever thread count a graph asks for.

    A model here is a chain of small sessions per token (embed, blocks, experts, head). With a thread pool per
    session, threads that spin after one session's run steal the cores from the next's (decode measured 4x slower),
    so those pools must not spin, and each run wakes its own sleeping threads. One pool shared by every session may
    spin: the next run is its own. Measured on the SmolLM2 int4 bundle with one expert, 2 threads, 4 rounds each:
    decode 77.0 / 70.3 tok/s with pools per session, 95.5 / 88.3 with one global pool (90.2 with it not spinning).

    Only for a process whose sessions are all the runtime's (the `mode-edge run` command, a benchmark's worker), and
    best called before its first session: once the global pool exists, onnxruntime refuses any session with a pool
    of its own. Calling it again with the same `threads` does nothing; with others raises ValueError (the pool is
    made once)."""
    from onnxruntime.capi import _pybind_state

    if _global_pool and _global_pool[0] != threads:
        raise ValueError(f"the global thread pool has {_global_pool[0]} threads; it cannot be remade with {threads}")
    if not _global_pool:
        _pybind_state.set_global_thread_pool_sizes(threads or 0, 1)
        _global_pool.append(threads)


SLIDING_WINDOW_ORT = (1, 24)
"""The first onnxruntime whose GroupQueryAttention local_window_size counts the query itself (onnxruntime PR #25927),
as the exported sliding-window layers (Gemma 3) need: earlier releases attend to one key more, silently."""


def check_sliding_window_support(bundle: str) -> None:
    """Raise UserError when this process's onnxruntime predates SLIDING_WINDOW_ORT (for a bundle with sliding
    layers)."""
    import onnxruntime as ort

    have = tuple(int(p) for p in ort.__version__.split(".")[:2])
    if have < SLIDING_WINDOW_ORT:
        raise UserError(f"bundle {bundle} has sliding-window layers, whose window onnxruntime {ort.__version__} "
                        f"counts one key wider (fixed in 1.24); `pip install 'onnxruntime>=1.24'`")  # fmt: skip


def session_options(threads: int | None, optimized_ahead: bool = False):
    """The onnxruntime SessionOptions of the runtime's sessions: the shared arena, prepacking on the thread pool, no
    memory patterns, the process's global thread pool where it has one (else a pool of `threads` that does not
    spin); with `optimized_ahead` (a graph saved by onnxruntime's optimizer at export: its component's
    `onnx_optimized` is mode_edge/bundle.ONNX_OPTIMIZED_AHEAD) no graph optimization."""
    import onnxruntime as ort

    share_one_arena()
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    # Prepacking the 4-bit weights for onnxruntime's kernels is most of a session's creation (an expert switch
    # creates three): on the thread pool it takes 3 SmolLM2 expert graphs from 22.5 to 16.8 ms (2 threads).
    options.add_session_config_entry("session.prepack.enable_parallel", "1")
    # A memory pattern plans each run's activations as one block per input shape; with the cache's length
    # growing every step those blocks grow too, and the shared arena kept more of them. Measured on the SmolLM2
    # int4 bundle with one expert (benchmarks/peers.py's run in one process: 128, 512, 896-token prompts):
    # peak RSS 383-386 -> 366-367 MB, TTFT and decode unchanged within noise.
    options.enable_mem_pattern = False
    if optimized_ahead:  # its fusions are in the file: optimizing again would only cost the time
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if _global_pool:
        options.use_per_session_threads = False
    else:  # a pool of its own, which must not spin (use_global_thread_pool says why)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
    return options


class OnnxGraph:
    def __init__(self, path: Path, threads: int | None, optimized_ahead: bool = False):
        """onnxruntime's session of the graph at `path`, with the runtime's options (`session_options`)."""
        import onnxruntime as ort

        options = session_options(threads, optimized_ahead)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, dict(zip(self.inputs, arrays)))

    def run_in_place(self, arrays: list[np.ndarray], kv: list[np.ndarray], bindings: dict, key: str,
                     ) -> list[np.ndarray]:  # fmt: skip
        """Run a "buffer" graph (runtimes/kv_cache.py): `arrays` are its inputs before the cache, `kv` its cache
        buffers in input order, each bound as both its past_* input and the matching present_* output, so that
        GroupQueryAttention writes into them. Returns the outputs before the cache. The binding of the buffers is
        made once and kept in bindings[key] with this session (a cache drops its bindings when its buffers grow)."""
        import onnxruntime as ort

        n_out = len(self.outputs) - len(kv)
        kept = bindings.get(key)
        if kept is None or kept[0] is not self.session:
            pasts = self.inputs[len(arrays) :]
            presents = ["present_" + name.removeprefix("past_") for name in pasts]
            if len(pasts) != len(kv) or presents != self.outputs[n_out:]:
                raise ValueError(f"{key}: inputs {pasts} do not pair with outputs {self.outputs[n_out:]}")
            binding = self.session.io_binding()
            for name in self.outputs[:n_out]:  # first: get_outputs() lists outputs in the order they were bound
                binding.bind_output(name, "cpu")
            values = [ort.OrtValue.ortvalue_from_numpy(b) for b in kv]  # the buffers' memory, not a copy
            for past, present, value in zip(pasts, presents, values):
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            kept = bindings[key] = (self.session, binding, values)
        binding = kept[1]
        for name, a in zip(self.inputs, arrays):
            binding.bind_cpu_input(name, np.ascontiguousarray(a))
        for name in self.outputs[:n_out]:  # again: a bound output keeps the last run's tensor, of the last T
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return [v.numpy() for v in binding.get_outputs()[:n_out]]


CPUINFO_NOTES = "[cpuinfo_utils.cpp:"
"""How the lines start that ExecuTorch's XNNPACK delegate logs, at info level, when it first loads in a process: what
it reads of /sys to tell the CPU (five lines on x86 hosts, where those ARM files are absent)."""


@contextlib.contextmanager
def without_cpuinfo_notes():
    """Hold back CPUINFO_NOTES lines written to stderr meanwhile. They come from C code, below Python's logging, so
    the process's stderr (fd 2) points at a temporary file meanwhile, and every other line is passed on after."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode(errors="replace").splitlines(keepends=True)
            sys.stderr.write("".join(line for line in lines if not line.startswith(CPUINFO_NOTES)))
            sys.stderr.flush()


class PteGraph:
    def __init__(self, path: Path):
        try:
            import executorch.kernels.quantized  # noqa: F401  (the int8 embedding's kernel, quantized_decomposed)
            from executorch.runtime import Runtime
        except ImportError:
            raise UserError("the ExecuTorch backend needs `pip install executorch`; or use --backend onnx") from None
        self.program = Runtime.get().load_program(str(path))
        with without_cpuinfo_notes():
            self.method = self.program.load_method("forward")

    def __call__(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        import torch  # the ExecuTorch Python runtime exchanges torch tensors; the ONNX path never imports torch

        # An empty cache has zero strides in numpy, which ExecuTorch refuses: give it a fresh, contiguous tensor.
        tensors = [torch.from_numpy(np.ascontiguousarray(a)) if a.size else torch.empty(a.shape) for a in arrays]
        return [o.numpy() for o in self.method.execute(tensors)]


def load_graph(path: Path, threads: int | None = None, optimized_ahead: bool = False):
    """The graph at `path` (.onnx or .pte) as a callable; `optimized_ahead`: an ONNX graph its manifest records as
    saved by onnxruntime's optimizer (`onnx_optimized`), loaded without optimizing it again."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxGraph(path, threads, optimized_ahead)
    if path.suffix == ".pte":
        return PteGraph(path)
    raise ValueError(f"no backend for {path}")
