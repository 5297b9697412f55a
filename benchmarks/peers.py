"""mode-edge beside the runtimes a user would pick instead, on the same backbone, machine, prompts and threads.

    python benchmarks/peers.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf [--gguf Q8_0.gguf] --genai GENAI_INT4 \\
        [--genai GENAI_INT8] --bundle int4=BUNDLE_INT4 [--bundle int8=BUNDLE_INT8] [--expert code] [--threads 2] \\
        [--rounds 3] [--new-tokens 128]

Variants: llama.cpp (llama-cpp-python, `pip install llama-cpp-python` built with CMAKE_ARGS="-DGGML_NATIVE=OFF
-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON": GGML_NATIVE enables AMX here and crashes) on each --gguf (the GGUF the
backbone ships as, Q4_1, and --prepare's Q8_0 of it), and with --lora-gguf loaded at start; onnxruntime-genai (`pip
install onnxruntime-genai`) on each of its builder's outputs (`python -m onnxruntime_genai.models.builder -i
CHECKPOINT -o GENAI -p int4 -e cpu`, or `-p int8`, CHECKPOINT the backbone saved as a Hugging Face folder), and on
each --genai-lora, its build with a LoRA adapter (`--extra_options
adapter_path=LORA`: each LoRA a MatMul pair beside its projection, quantized as the build is, fixed in
the graph); mode-edge's Python
runtime on each --bundle, base only and with --expert loaded, and with --native the native runtime (C++,
runtimes/native: `make native`) on each bundle too. The LoRA adapter (--prepare) has about one expert's
parameters (LORA_RANK). Each measurement is a
fresh process (so load time and peak RSS are its own), greedy, the same token ids for all (the start of this
repository's runtimes/engine.py, tokenized by the backbone's tokenizer), every run generating exactly --new-tokens
(end-of-sequence ignored); the variants take turns for --rounds rounds and the medians are reported. Figures: load
s, TTFT and prefill tok/s at 128 and 512 prompt tokens, decode tok/s over --new-tokens after the 128-token prompt
and over 64 tokens ending at 1,024 tokens of context, peak RSS (VmHWM), bytes on disk, the memory-bandwidth floor
(weight bytes over a numpy copy's bandwidth), and where there is something to switch (llama.cpp's LoRA, mode-edge's
expert) the time to load it again beside the time to read its files.
Run it on idle cores; `make bench-peers` installs the two peers, prepares their builds at 4 and 8 bits (--prepare)
and runs them beside BUNDLE (default runs/demo/bundle, the demo's int8 bundle). Writes
benchmarks/results/peers.{json,md} and peers.png (or --name's).
The native runtime generates once a process, so its figures come from three fresh processes a round (the 128-token
prompt with --new-tokens, the 512-token prompt, the 1,024-token context), its peak RSS the largest of the three, its
load the base's and the expert's graphs; it stops at end-of-sequence (the decode figures count what it generated)
and its switch is `benchmarks/native.py`'s to measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, machine, write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LENGTHS = (128, 512)
SWITCHES = 5
"""Adapter / expert switches timed per run (median), after the other figures."""
LONG_CONTEXT, LONG_DECODE = 1024, 64
"""Decode is also timed over the last LONG_DECODE tokens of a LONG_CONTEXT-token context (a cache that grows)."""


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prompt_ids(tokenizer_json: Path, n: int) -> list[int]:
    """The first n token ids of runtimes/engine.py under the backbone's tokenizer (repeated if it is shorter)."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer_json)).encode((ROOT / "runtimes" / "engine.py").read_text()).ids
    return (ids * (n // len(ids) + 1))[:n]


class LlamaCpp:
    """llama.cpp on the GGUF, with the LoRA adapter `lora` attached after the model loads (llama-cpp-python's own
    lora_path would load the base without mmap, which changes its load time and memory, not only the LoRA's)."""

    def __init__(self, gguf: str, threads: int, lora: str | None = None):
        from llama_cpp import Llama

        self.llm = Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=1024, n_batch=512,
                         verbose=False)  # fmt: skip
        self.lora, self.adapter = lora, None
        if lora:
            self.adapter = self.attach(lora)

    def attach(self, path: str):
        """Load the LoRA GGUF at `path` and make it the context's only adapter (scale 1); returns it."""
        import llama_cpp

        adapter = llama_cpp.llama_adapter_lora_init(self.llm.model, path.encode())
        if adapter is None:
            raise RuntimeError(f"llama.cpp could not load the LoRA adapter {path}")
        if not self.use(adapter):
            llama_cpp.llama_adapter_lora_free(adapter)
            raise RuntimeError(f"llama.cpp could not set the LoRA adapter {path}")
        return adapter

    def use(self, adapter) -> bool:
        """Make `adapter` the context's only LoRA adapter, at scale 1; False where llama.cpp refuses."""
        import llama_cpp

        adapters, scales = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter), (llama_cpp.ctypes.c_float * 1)(1.0)
        return llama_cpp.llama_set_adapters_lora(self.llm.ctx, adapters, 1, scales) == 0

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self.greedy()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self.greedy()

    def switch_s(self) -> float:
        """Seconds to load the LoRA adapter again from its file and make it the context's adapter (a switch
        between adapters of this size; llama.cpp rebuilds its compute graph at the next decode, not timed here),
        after which the first adapter is the context's again."""
        import llama_cpp

        t = time.perf_counter()
        adapter = self.attach(self.lora)
        took = time.perf_counter() - t
        self.use(self.adapter)
        llama_cpp.llama_adapter_lora_free(adapter)
        return took

    def greedy(self) -> int:
        """argmax of the last position's logits (llama-cpp-python 0.3.x keeps `scores` only with logits_all)."""
        import llama_cpp

        logits = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self.llm.n_vocab(),))))


class Genai:
    """onnxruntime-genai on a copy of the builder's config with the thread count set (the model files linked)."""

    def __init__(self, folder: str, threads: int, new_tokens: int):
        import onnxruntime_genai as og

        self.tmp = tempfile.TemporaryDirectory()
        for f in Path(folder).resolve().iterdir():  # (absolute: the links live in another folder)
            os.symlink(f, Path(self.tmp.name) / f.name)
        config = json.loads((Path(folder) / "genai_config.json").read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update({"intra_op_num_threads": threads, "inter_op_num_threads": 1})
        os.unlink(Path(self.tmp.name) / "genai_config.json")
        (Path(self.tmp.name) / "genai_config.json").write_text(json.dumps(config))
        self.og, self.model, self.new_tokens = og, og.Model(self.tmp.name), new_tokens

    def prefill(self, ids: list[int]) -> int:
        params = self.og.GeneratorParams(self.model)
        n = len(ids) + max(self.new_tokens, LONG_DECODE + 1)
        params.set_search_options(max_length=n, min_length=n, do_sample=False)  # min_length: no stop at EOS
        self.generator = self.og.Generator(self.model, params)
        self.generator.append_tokens(ids)
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])

    def step(self, token: int) -> int:
        self.generator.generate_next_token()
        return int(self.generator.get_next_tokens()[0])


class ModeEdge:
    def __init__(self, bundle: str, threads: int, expert: str | None, new_tokens: int):
        from mode_edge.runtimes.backends import use_global_thread_pool
        from mode_edge.runtimes.engine import Engine  # noqa: F401 - imported here: part of the load time
        from mode_edge.runtimes.session import Session

        use_global_thread_pool(threads)  # as `mode-edge run` does: this process's sessions are all the runtime's
        self.session = Session(Path(bundle), threads=threads)
        self.session.select([expert] if expert else [])
        self.engine, self.new_tokens = self.session.engine, new_tokens

    def prefill(self, ids: list[int]) -> int:
        # sized for the whole run, as generate() sizes it (and as genai's max_length and llama.cpp's n_ctx are)
        self.cache = self.engine.new_cache(len(ids) + max(self.new_tokens, LONG_DECODE + 1))
        logits = self.engine.forward(np.array([ids], dtype=np.int64), self.cache, last_only=True)
        return int(np.argmax(logits[0, -1]))

    def step(self, token: int) -> int:
        logits = self.engine.forward(np.array([[token]], dtype=np.int64), self.cache)
        return int(np.argmax(logits[0, -1]))

    def switch_s(self) -> float:
        """Seconds to load the expert again (its sessions created from its files) after evicting it."""
        (name,) = self.session.engine.active
        self.session.evict(name)
        t = time.perf_counter()
        self.session.select([name])
        return time.perf_counter() - t


def files_read_s(spec: dict) -> float:
    """Seconds to read the files a switch loads (the LoRA GGUF; the expert's pack files), from the page cache."""
    if spec["kind"] == "llama.cpp":
        files = [Path(spec["lora"])]
    else:
        from mode_edge.bundle import expert_folder, read_bundle

        folder = expert_folder(spec["path"], read_bundle(spec["path"]), spec["expert"])
        files = [folder / rel for rel in json.loads((folder / "pack.json").read_text())["files"]]
    t = time.perf_counter()
    for f in files:
        f.read_bytes()
    return time.perf_counter() - t


def worker(spec: dict) -> dict:
    """One fresh-process measurement of one variant (see the module docstring)."""
    t = time.perf_counter()
    if spec["kind"] == "llama.cpp":
        runtime = LlamaCpp(spec["path"], spec["threads"], spec.get("lora"))
    elif spec["kind"] == "genai":
        runtime = Genai(spec["path"], spec["threads"], spec["new_tokens"])
    else:
        runtime = ModeEdge(spec["path"], spec["threads"], spec.get("expert"), spec["new_tokens"])
    out = {"load_s": time.perf_counter() - t}
    for n in PROMPT_LENGTHS:
        ids = prompt_ids(Path(spec["tokenizer"]), n)
        t = time.perf_counter()
        token = runtime.prefill(ids)
        out[f"ttft_{n}_s"] = time.perf_counter() - t
        out[f"prefill_{n}_tok_s"] = n / out[f"ttft_{n}_s"]
        if n == PROMPT_LENGTHS[0]:
            tokens = [token]
            t = time.perf_counter()
            for _ in range(spec["new_tokens"] - 1):
                tokens.append(runtime.step(tokens[-1]))
            out["decode_tok_s"] = (spec["new_tokens"] - 1) / (time.perf_counter() - t)
            out["first_tokens"] = tokens[:16]  # greedy: the same model should start the same way everywhere
    ids = prompt_ids(Path(spec["tokenizer"]), LONG_CONTEXT - LONG_DECODE)  # decode speed after a long context
    token = runtime.prefill(ids)
    t = time.perf_counter()
    for _ in range(LONG_DECODE):
        token = runtime.step(token)
    out[f"decode_ctx{LONG_CONTEXT}_tok_s"] = LONG_DECODE / (time.perf_counter() - t)
    out["peak_rss_mb"] = peak_rss_mb()
    if spec.get("lora") or spec.get("expert"):  # after the peak: a switch's transient memory is not counted
        out["switch_s"] = statistics.median(runtime.switch_s() for _ in range(SWITCHES))
        out["switch_read_s"] = statistics.median(files_read_s(spec) for _ in range(SWITCHES))
    return out


def native_worker(spec: dict) -> dict:
    """The native runtime's figures for one round (see the module docstring): fresh `mode-edge-native run`
    processes on the same token ids, each one's --json profile and kernel high-water mark."""
    from native import native_profile

    out, peaks = {}, []
    with tempfile.TemporaryDirectory() as tmp:

        def run(ids: list[int], new_tokens: int) -> dict:
            profile, peak_mb = native_profile(Path(spec["path"]), spec.get("expert") or "none", ids, new_tokens,
                                              spec["threads"], Path(tmp) / "profile.json")  # fmt: skip
            peaks.append(peak_mb)
            return profile

        for n in PROMPT_LENGTHS:
            first = n == PROMPT_LENGTHS[0]
            p = run(prompt_ids(Path(spec["tokenizer"]), n), spec["new_tokens"] if first else 1)
            out[f"ttft_{n}_s"] = p["time_to_first_token_s"]
            out[f"prefill_{n}_tok_s"] = n / p["time_to_first_token_s"]
            if first:
                out["load_s"] = sum(p["load_s"].values())
                out["decode_tok_s"] = p["decode_tokens_per_s"]
                out["new_tokens"] = p["new_tokens"]
        p = run(prompt_ids(Path(spec["tokenizer"]), LONG_CONTEXT - LONG_DECODE), LONG_DECODE + 1)
        out[f"decode_ctx{LONG_CONTEXT}_tok_s"] = p["decode_tokens_per_s"]
    out["peak_rss_mb"] = max(peaks)
    return out


def run_worker(spec: dict) -> dict:
    if spec["kind"] == "native":
        return native_worker(spec)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['label']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def copy_bandwidth_gb_s(mb: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth from a numpy copy (read + write bytes per second), the best of `repeats`."""
    a = np.ones(mb << 18, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def disk_bytes(kind: str, path: str, expert: str | None, lora: str | None = None) -> int:
    """Bytes of the model's files: the GGUF (plus the LoRA GGUF); the genai folder's model files; the bundle's base
    plus the expert."""
    p = Path(path)
    if kind == "llama.cpp":
        return p.stat().st_size + (Path(lora).stat().st_size if lora else 0)
    if kind == "genai":
        return sum(f.stat().st_size for f in p.iterdir() if f.name.startswith("model.onnx"))
    from mode_edge.bundle import read_bundle, total_bytes

    manifest = read_bundle(p)
    return total_bytes(manifest["files"]) + (manifest["experts"][expert]["bytes"] if expert else 0)


def plot(med: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = list(med)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("decode_tok_s", "ttft_128_s", "peak_rss_mb"),
                              ("decode tok/s (higher is better)", "TTFT at 128 tokens, s", "peak RSS, MB")):
        ax.barh(labels, [med[k][key] for k in labels], color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)


LORA_RANK = 64
"""The peers' LoRA adapter: rank 64 on all seven projections of every layer, 19.5M parameters on SmolLM2-135M,
about one mode-edge expert's size (the demo's code expert: 21.2M)."""
GGUF_PROJECTIONS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                    "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
"""Hugging Face projection names -> llama.cpp's tensor names (blk.N.NAME.weight)."""


def make_lora(ckpt: Path, out: Path) -> None:
    """A peft LoRA adapter (adapter_config.json + adapter_model.safetensors) of rank LORA_RANK on every projection
    of the checkpoint folder `ckpt`, alpha = rank (scale 1). Its B matrices are drawn from N(0, 0.02) (peft starts
    them at zero, which would leave the outputs unchanged); the speed of a LoRA does not depend on its values."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=list(GGUF_PROJECTIONS))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    model.save_pretrained(out)


def rope_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """(heads * head_dim, ...) -> the same rows in llama.cpp's order for q_proj / k_proj (its converter interleaves
    each head's two rotary halves: convert_hf_to_gguf.py, LlamaModel.permute), applied to a LoRA's B, whose rows are
    the projection's outputs."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def lora_gguf(adapter: Path, ckpt: Path, out: Path) -> None:
    """The peft adapter folder `adapter` (of the Llama checkpoint `ckpt`) as a llama.cpp LoRA GGUF (F16): general.type
    "adapter", adapter.type "lora", adapter.lora.alpha, and per projection blk.N.NAME.weight.lora_a (r, in) and
    .lora_b (out, r), as llama.cpp's convert_lora_to_gguf.py writes them (llama-adapter.cpp reads them)."""
    import re

    import gguf
    from safetensors.numpy import load_file

    config = json.loads((ckpt / "config.json").read_text())
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for name, value in sorted(load_file(adapter / "adapter_model.safetensors").items()):
        layer, projection, half = re.fullmatch(r".*\.layers\.(\d+)\.\w+\.(\w+)\.lora_([AB])\.weight", name).groups()
        if half == "B" and projection in heads:
            value = rope_permute(value, heads[projection])
        gguf_name = f"blk.{layer}.{GGUF_PROJECTIONS[projection]}.weight.lora_{half.lower()}"
        writer.add_tensor(gguf_name, value.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def requantize_gguf(source: Path, out: Path) -> None:
    """The GGUF `source` written again at Q8_0 by llama.cpp's own quantizer (llama_model_quantize with
    allow_requantize: each tensor dequantized from its blocks, then rounded to Q8_0), for llama.cpp at 8 bits."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, True, os.cpu_count() or 1
    partial = out.with_name(out.name + ".partial")
    try:
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not requantize {source} to Q8_0")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)


def prepare(folder: Path) -> None:
    """FOLDER/ckpt: the built-in backbone as a Hugging Face folder (transformers refuses save_pretrained on a model
    it loaded from GGUF, so a LlamaForCausalLM is built from that model's config and given its state dict),
    FOLDER/genai-int4 and FOLDER/genai-int8: onnxruntime-genai's builder run on it at 4 and 8 bits, FOLDER/lora: a
    LoRA adapter of about one expert's size (`make_lora`), FOLDER/lora.gguf: the same for llama.cpp,
    FOLDER/genai-int4-lora and FOLDER/genai-int8-lora: genai's builder with the adapter (it adds each LoRA as a
    MatMul pair beside its projection), FOLDER/q8_0.gguf: the shipped GGUF at Q8_0 (`requantize_gguf`). Prints the
    shipped GGUF's path for --gguf. Skips what exists."""
    from mode_edge.training.backbones import resolve_spec

    directory, gguf = resolve_spec("smollm2")
    ckpt = folder / "ckpt"
    if not (ckpt / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(ckpt)
        AutoTokenizer.from_pretrained(directory, gguf_file=gguf).save_pretrained(ckpt)
    lora = folder / "lora"
    if not (lora / "adapter_config.json").is_file():
        make_lora(ckpt, lora)
    if not (folder / "lora.gguf").is_file():
        lora_gguf(lora, ckpt, folder / "lora.gguf.partial")
        os.replace(folder / "lora.gguf.partial", folder / "lora.gguf")
    for precision in ("int4", "int8"):
        for out, extra in ((folder / f"genai-{precision}", []),
                           (folder / f"genai-{precision}-lora", ["--extra_options", f"adapter_path={lora.resolve()}"])):
            if not (out / "genai_config.json").is_file():
                subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt), "-o",
                                str(out), "-p", precision, "-e", "cpu", *extra], check=True, stdout=sys.stderr)
    if not (folder / "q8_0.gguf").is_file():
        requantize_gguf(directory / gguf, folder / "q8_0.gguf")
    print(directory / gguf)  # the only line on stdout: `make bench-peers` reads it


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, help="Make the peers' builds in this folder (see `prepare`) and exit.")
    ap.add_argument("--gguf", action="append", default=[], help="A GGUF file of the backbone (llama.cpp; repeatable: "
                    "the shipped Q4_1, --prepare's FOLDER/q8_0.gguf).")
    ap.add_argument("--genai", action="append", default=[], help="onnxruntime-genai's builder output folder "
                    "(repeatable: --prepare writes FOLDER/genai-int4 and FOLDER/genai-int8).")
    ap.add_argument("--lora-gguf", help="A llama.cpp LoRA adapter (GGUF) of the backbone: adds llama.cpp with it "
                    "loaded at start, on each --gguf (--prepare writes FOLDER/lora.gguf).")
    ap.add_argument("--genai-lora", action="append", default=[], help="onnxruntime-genai's builder output with a "
                    "LoRA adapter built in (repeatable: --prepare writes FOLDER/genai-int4-lora and "
                    "FOLDER/genai-int8-lora).")
    ap.add_argument("--bundle", action="append", default=[], help="LABEL=PATH: a mode-edge bundle (repeatable).")
    ap.add_argument("--expert", default="code", help="The expert loaded in the 'with one expert' rows.")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--native", action="store_true", help="Also the native runtime (build/native/mode-edge-native) on "
                    "each bundle.")  # fmt: skip
    ap.add_argument("--name", default="peers", help="Results file name in benchmarks/results/ (no suffix).")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.prepare:
        prepare(args.prepare)
        return
    if not args.bundle:
        ap.error("give at least one --bundle (its tokenizer is the prompts' too)")
    if args.rounds < 1 or args.new_tokens < 2:
        ap.error("--rounds must be at least 1 and --new-tokens at least 2 (decode is timed after the first token)")
    if args.native:
        from native import NATIVE

        if not NATIVE.exists():
            ap.error(f"--native: {NATIVE} is missing; build it with `make native`")
    if any("=" not in b for b in args.bundle):
        ap.error("--bundle takes LABEL=PATH")
    names = [b.split("=", 1)[0] for b in args.bundle]
    if len(set(names)) < len(names):
        ap.error(f"--bundle labels repeat: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    bundles = dict(b.split("=", 1) for b in args.bundle)
    tokenizer = str(Path(next(iter(bundles.values()))) / "tokenizer.json")
    common = {"threads": args.threads, "new_tokens": args.new_tokens, "tokenizer": tokenizer}
    specs = []
    for gguf in args.gguf:
        specs.append({"label": f"llama.cpp {Path(gguf).name}", "kind": "llama.cpp", "path": gguf})
        if args.lora_gguf:
            specs.append({"label": f"llama.cpp {Path(gguf).name} + LoRA {Path(args.lora_gguf).name}",
                          "kind": "llama.cpp", "path": gguf, "lora": args.lora_gguf})  # fmt: skip
    for genai in args.genai + args.genai_lora:
        specs.append({"label": f"onnxruntime-genai {Path(genai).name}", "kind": "genai", "path": genai})
    for label, path in bundles.items():
        specs.append({"label": f"mode-edge {label}, base only", "kind": "mode-edge", "path": path})
        specs.append({"label": f"mode-edge {label} + {args.expert}", "kind": "mode-edge", "path": path,
                      "expert": args.expert})  # fmt: skip
        if args.native:
            specs.append({"label": f"mode-edge native {label}, base only", "kind": "native", "path": path})
            specs.append({"label": f"mode-edge native {label} + {args.expert}", "kind": "native", "path": path,
                          "expert": args.expert})  # fmt: skip
    labels = [s["label"] for s in specs]
    if len(set(labels)) < len(labels):  # (results are keyed by label: two files of one name would be merged)
        ap.error(f"two variants would share a label: {sorted({x for x in labels if labels.count(x) > 1})}; give "
                 "files of different names")  # fmt: skip
    runs: dict[str, list[dict]] = {s["label"]: [] for s in specs}
    for r in range(args.rounds):
        for spec in specs:
            runs[spec["label"]].append(run_worker({**common, **spec}))
            print(f"round {r + 1}/{args.rounds}: {spec['label']}: {runs[spec['label']][-1]}", file=sys.stderr)
    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "first_tokens"}
           for label, rs in runs.items()}  # fmt: skip
    bandwidth = copy_bandwidth_gb_s()
    sizes = {s["label"]: disk_bytes(s["kind"], s["path"], s.get("expert"), s.get("lora")) for s in specs}
    md = [f"# mode-edge beside llama.cpp and onnxruntime-genai ({args.threads} threads, greedy, median of "
          f"{args.rounds} interleaved fresh-process runs)", "",
          f"Decode over {args.new_tokens} new tokens after a 128-token prompt; memory-bandwidth floor from a numpy "
          f"copy: {bandwidth:.1f} GB/s (the decode tok/s if every weight byte on disk were read once per token).", "",
          "| runtime | load s | TTFT 128 ms | TTFT 512 ms | prefill 512 tok/s | decode tok/s | at 1,024 ctx | "
          "peak RSS MB | disk MB | floor tok/s | switch ms (read ms) |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, m in med.items():
        switch = f"{1000 * m['switch_s']:.1f} ({1000 * m['switch_read_s']:.1f})" if "switch_s" in m else "-"
        md.append(f"| {label} | {m['load_s']:.2f} | {1000 * m['ttft_128_s']:.0f} | {1000 * m['ttft_512_s']:.0f} | "
                  f"{m['prefill_512_tok_s']:.0f} | {m['decode_tok_s']:.1f} | {m[f'decode_ctx{LONG_CONTEXT}_tok_s']:.1f} "
                  f"| {m['peak_rss_mb']:.0f} | {sizes[label] / 1e6:.1f} | {bandwidth * 1e9 / sizes[label]:.0f} | "
                  f"{switch} |")  # fmt: skip
    data = {"specs": specs, "runs": runs, "median": med, "disk_bytes": sizes, "copy_bandwidth_gb_s": bandwidth,
            "new_tokens": args.new_tokens, "threads": args.threads, "machine": machine()}  # fmt: skip
    write(args.name, data, "\n".join(md) + "\n")
    plot(med, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
