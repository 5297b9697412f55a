"""What the terminal shows is ours: the libraries' own log lines below WARNING, and their Python warnings, stay
hidden unless `mode-edge --verbose` (DESIGN §5).

onnxruntime's int4/int8 quantizer calls `logging.basicConfig(level=INFO)` when imported, which made an export print
about a thousand INFO lines from onnx_ir; a root handler installed first turns that call into a no-op, and its level
drops what a library logs below WARNING even where the library lowered its own logger's level.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

LIBRARIES = ("onnx_ir", "onnxscript", "onnx", "onnxruntime", "torch", "executorch", "torchao", "transformers",
             "peft", "safetensors", "huggingface_hub", "matplotlib", "PIL", "urllib3")  # fmt: skip
IMPORT_NOISE = ("torchao",)
"""Libraries whose WARNING lines are import-time notes about hardware this machine lacks (torchao: its CUDA kernels
and triton on a CPU build, logged whenever transformers or the export imports it); shown only with --verbose."""
VERBOSE_ENV = "MODE_EDGE_VERBOSE"
"""Set for child processes (`mode-edge reproduce` trains in subprocesses) so that they log as their parent does."""


def configure(verbose: bool = False) -> None:
    """Route every library log line through one stderr handler: WARNING and above by default, everything when
    verbose. Quiet mode also hides the libraries' Python warnings (deprecations, tracer notes)."""
    level = logging.DEBUG if verbose else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.WARNING)
    for name in LIBRARIES:
        quiet = logging.ERROR if name in IMPORT_NOISE else logging.WARNING
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else quiet)
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    pattern = r"(" + "|".join(LIBRARIES) + r")(\.|$)"
    for category in (DeprecationWarning, FutureWarning, UserWarning, RuntimeWarning):
        warnings.filterwarnings("ignore", category=category, module=pattern)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
