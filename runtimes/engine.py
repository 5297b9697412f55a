"""The split model on the device: base graphs, the loaded experts' graphs, the gate's mix, a KV cache, generation.

Works on token ids (tokenization sits at the edge, in the caller). No torch: numpy + onnxruntime.

    h = embed(ids)
    for each block i:  y_bb, kv = block_i(h, kv);  y_j, g_j, kv = expert_j,i(h, kv) for every loaded expert j
                       a = softmax([0, g_1 .. g_N]);  h = a_0 * y_bb + sum_j a_j * y_j
    logits = head(h)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mode_edge.bundle import (
    ONNX_OPTIMIZED_AHEAD,
    REEXPORT,
    check_pack_fits,
    expert_folder,
    read_bundle,
    read_pack_manifest,
    reinstall_fix,
    verify_files,
)
from mode_edge.errors import UserError
from mode_edge.integrity import checked_load
from mode_edge.names import check_name
from mode_edge.ranges import check_number, check_optional, check_seed
from mode_edge.rope import rotary_pairs
from mode_edge.runtimes.backends import check_sliding_window_support, load_graph
from mode_edge.runtimes.kv_cache import Cache
from mode_edge.signing import check_installed_signature


class LoadedExpert:
    def __init__(self, name: str, folder: Path, pack: dict, blocks: list):
        self.name, self.folder, self.pack, self.blocks = name, folder, pack, blocks


PREFILL_CHUNK = 256
"""Most tokens one ONNX call takes: a longer prompt is fed in chunks, which bounds the activations (attention scores
grow with tokens x context) that onnxruntime's arena keeps for the rest of the run. Measured on the int4 SmolLM2
bundle with one expert, 960-token prompt, 2 threads, with the previous graph interface: TTFT 1.48 -> 1.16 s and peak
RSS 566 -> 444 MB against one call (512 and 128 tokens worse or equal); with GroupQueryAttention a 1,024-token
prompt takes the same time in chunks of 128, 256 or one call (~930 ms)."""


class Engine:
    """The bundle's base graphs, loaded once; experts come and go with `load_expert` / `unload_expert`."""

    def __init__(self, bundle: Path, backend: str = "onnx", threads: int | None = None, verify: bool = True,
                 trusted_keys: dict | None = None):  # fmt: skip
        """trusted_keys: keys pinned by the caller (signing.pinned_keys); when given, every expert must carry the
        signature of one of them (checked at each load, before its files)."""
        check_optional("threads", threads, lo=1, integer=True)
        if trusted_keys and not verify:
            raise UserError("pinned keys (--trust) vouch for a pack's files through their sha256, so the files must "
                            "be verified: drop --no-verify")  # fmt: skip
        self.bundle = Path(bundle)
        self.trusted_keys = trusted_keys or {}
        self.manifest = read_bundle(self.bundle)
        if backend not in self.manifest["formats"]:
            mixed = self.manifest["quantization"].get("scheme") == "mixed" and backend == "executorch"
            how = f"--format {backend}" if not mixed else "--quant int4 or int8 and --format executorch (mixed: ONNX)"
            raise UserError(
                f"bundle {bundle} has no {backend} graphs (it has {', '.join(self.manifest['formats'])}); "
                f"re-export with {how} or choose --backend {self.manifest['formats'][0]}"
            )
        if verify:  # sizes at every start, sha256 once per file version (mode_edge/integrity.py)
            verify_files(self.bundle, self.manifest["files"], f"bundle {bundle}", REEXPORT)
        self.backend, self.threads = backend, threads
        if backend == "onnx" and self.manifest["base"]["decoder"].get("sliding_window"):
            check_sliding_window_support(str(bundle))
        comps = self.manifest["components"]
        self.n_blocks = len(self.manifest["base"]["block_ranges"])
        self.embed = self._graph(comps["base/embed"][backend], component=comps["base/embed"])
        self.blocks = [self._graph(comps[f"base/block{i}"][backend], component=comps[f"base/block{i}"])
                       for i in range(self.n_blocks)]  # fmt: skip
        self.head = self._graph(comps["base/head"][backend], component=comps["base/head"])
        self.block_layers = [comps[f"base/block{i}"]["layers"] for i in range(self.n_blocks)]
        d = self.manifest["base"]["decoder"]
        self.kv_shape = (d["n_kv_heads"], d["head_dim"])
        self.ropes = rotary_pairs(d["rope_theta"], d.get("rotary_dim") or d["head_dim"], d.get("rope_scaling"),
                                  d.get("rope_local_theta"))  # fmt: skip
        """The rotary frequencies (r/2,) float64 and scale of each pair of cos/sin tables the "buffer" graphs take
        (r: the rotated dimensions of a head, rotary_dim or head_dim; mode_edge/rope.rotary_pairs)."""
        self.kv_cache: str = self.manifest["kv_cache"][backend]
        """How the graphs take their cache: "buffer" (written in place) or "concat" (runtimes/kv_cache.py)."""
        limits = self.manifest.get("executorch") if backend == "executorch" else None
        limits = limits if isinstance(limits, dict) else {}  # an older .pte export: any length
        self.tokens_per_call: int | None = limits.get("tokens_per_call")
        """Most tokens one graph call takes (a .pte's bound; None: any); forward feeds longer inputs in chunks."""
        self.context: int = min(d["max_seq_len"], limits.get("context", d["max_seq_len"]))
        """The longest context these graphs hold: the backbone's, or less for .pte graphs exported for less."""
        self.experts: dict[str, LoadedExpert] = {}
        self.active: list[str] | None = None
        """The experts a forward mixes, in order; None: every loaded expert (a Session keeps others warm)."""

    def _graph(self, rel: str, fix: str = REEXPORT, folder: Path | None = None, component: dict | None = None):
        """The graph at REL inside `folder` (default: the bundle's root); `component`: its manifest entry, whose
        `onnx_optimized` says whether the ONNX file was optimized at export (ONNX_OPTIMIZED_AHEAD)."""
        path = (folder if folder is not None else self.bundle) / rel
        ahead = self.backend == "onnx" and (component or {}).get("onnx_optimized") == ONNX_OPTIMIZED_AHEAD
        return checked_load(path, lambda: load_graph(path, self.threads, ahead), fix)

    @property
    def call_tokens(self) -> int:
        """Most tokens one call of the graphs takes: the .pte graphs' bound, else PREFILL_CHUNK."""
        return self.tokens_per_call or PREFILL_CHUNK

    @property
    def installed(self) -> list[str]:
        return sorted(self.manifest["experts"])

    def load_expert(self, name: str, verify: bool = True) -> LoadedExpert:
        if name in self.experts:
            return self.experts[name]
        check_name(name)
        if name not in self.manifest["experts"]:
            raise UserError(
                f"expert {name!r} is not installed in {self.bundle} (installed: {', '.join(self.installed) or 'none'});"
                " install its pack with `mode-edge install`"
            )
        folder = expert_folder(self.bundle, self.manifest, name)
        pack = self.check_expert(name, verify)
        components = [pack["components"][f"block{i}"] for i in range(self.n_blocks)]
        blocks = [self._graph(c[self.backend], reinstall_fix(folder), folder, c) for c in components]
        self.experts[name] = LoadedExpert(name, folder, pack, blocks)
        return self.experts[name]

    def check_expert(self, name: str, verify: bool = True) -> dict:
        """The installed expert's pack manifest, checked against the bundle manifest (its sha256), the base, the
        pinned keys (its signature, when the engine has trusted_keys) and (with `verify`) every file it lists; a
        damaged expert raises a UserError naming the file and the fix."""
        folder = expert_folder(self.bundle, self.manifest, name)
        pack_sha = self.manifest["experts"][name]["pack_sha256"]
        pack = read_pack_manifest(folder, pack_sha, self.n_blocks)
        check_pack_fits(pack, self.manifest, f"expert {name!r} in {self.bundle}")
        if self.trusted_keys:
            check_installed_signature(folder, name, pack, pack_sha, self.trusted_keys, reinstall_fix(folder))
        if verify:  # with pinned keys every file is hashed: the hash cache lives in the writable bundle
            verify_files(folder, pack["files"], f"expert {name!r}", reinstall_fix(folder),
                         cached=not self.trusted_keys)  # fmt: skip
        return pack

    def unload_expert(self, name: str) -> None:
        self.experts.pop(name, None)
        if self.active is not None and name in self.active:
            self.active.remove(name)

    def block_inputs(self, ids: np.ndarray) -> list[np.ndarray]:
        """The input of every block on the backbone-only path (what prompt routing scores), (1, T, d) each: one pass
        (in chunks, as `forward` feeds them), no cache kept."""
        step, cache = self.call_tokens, self.new_cache(ids.shape[1])
        inputs: list[list[np.ndarray]] = [[] for _ in self.blocks]
        for start in range(0, ids.shape[1], step):
            chunk = ids[:, start : start + step]
            positions = self.positions(cache, chunk.shape[1])
            (h,) = self.embed([chunk])
            for i, block in enumerate(self.blocks):
                inputs[i].append(h)
                (h,) = self._run_block(block, f"block{i}", self.block_layers[i], h, positions, cache)
            cache.pos += chunk.shape[1]
        return [np.concatenate(parts, axis=1) for parts in inputs]

    def new_cache(self, capacity_hint: int = 0) -> Cache:
        """An empty cache; `capacity_hint`: the positions it will likely hold (buffers are sized for them once)."""
        return Cache(capacity_hint=capacity_hint)

    def positions(self, cache: Cache, tokens: int) -> list[np.ndarray]:
        """Make room in `cache` for `tokens` more positions and return the position inputs of the "buffer" graphs
        ([] for "concat" graphs, which read positions off their cache); the caller advances cache.pos after the
        call. Raises UserError beyond the context."""
        total = cache.pos + tokens
        if total > self.context:
            raise UserError(f"{total} tokens exceed the context of these graphs ({self.context}); shorten the prompt "
                            "or --max-new-tokens")  # fmt: skip
        if self.kv_cache != "buffer":
            return []
        cache.reserve(total, self.context, *self.kv_shape, self.ropes)
        return cache.positions(tokens)

    def _run_block(self, graph, key: str, layers: int, h: np.ndarray, positions: list, cache: Cache,
                   ) -> list[np.ndarray]:  # fmt: skip
        """One block graph (backbone or expert, `layers` attention layers) on h (1, T, d) after cache.pos tokens;
        returns its outputs before the cache (hidden_out, and an expert's gate_logit); its cache under `key` in
        `cache` then holds this call's positions too (written into the buffers, or replaced by the grown arrays)."""
        if self.kv_cache == "buffer":
            kv = cache.buffers(key, layers, *self.kv_shape)
            return graph.run_in_place([h, *positions], kv, cache.bindings, key)
        past = cache.kv.get(key)
        if past is None:  # the prefill: nothing cached yet (the expert set is fixed for a cache's lifetime)
            past = [np.zeros((1, self.kv_shape[0], 0, self.kv_shape[1]), dtype=np.float32)] * (2 * layers)
        out = graph([h, *past])
        n = len(out) - 2 * layers
        cache.kv[key] = out[n:]
        return out[:n]

    def forward(self, ids: np.ndarray, cache: Cache, timer: Callable | None = None, last_only: bool = False,
                ) -> np.ndarray:  # fmt: skip
        """ids (1, T) int64 after cache.pos earlier tokens -> logits (1, T, V), or (1, 1, V) for the last token only
        (`last_only`: what generation needs; the head then multiplies one row, not T); grows the cache. Inputs
        longer than one call takes (the .pte graphs' tokens_per_call; PREFILL_CHUNK tokens for ONNX, which bounds
        the activations a long prompt holds at once) go through in chunks, each after the cache of the last."""
        step = self.call_tokens
        if ids.shape[1] > step:
            starts = range(0, ids.shape[1], step)  # (last_only: each chunk's last row only; the final one is kept)
            parts = [self._forward(ids[:, i : i + step], cache, timer, last_only) for i in starts]
            return parts[-1] if last_only else np.concatenate(parts, axis=1)
        return self._forward(ids, cache, timer, last_only)

    def _forward(self, ids: np.ndarray, cache: Cache, timer: Callable | None = None, last_only: bool = False,
                 ) -> np.ndarray:  # fmt: skip
        timed = timer or (lambda _what, fn: fn())
        active = [self.experts[n] for n in (self.active if self.active is not None else self.experts)]
        positions = self.positions(cache, ids.shape[1])
        (h,) = timed("embed", lambda: self.embed([ids]))  # (1, T, d)
        for i, block in enumerate(self.blocks):
            layers = self.block_layers[i]
            (y_bb,) = timed("backbone", lambda: self._run_block(block, f"block{i}", layers, h, positions, cache))
            if not active:
                h = y_bb
                continue
            ys, logits = [y_bb], [np.zeros(h.shape[:2], dtype=np.float32)]
            for expert in active:
                key = f"{expert.name}/block{i}"
                layers = expert.pack["components"][f"block{i}"]["layers"]
                y, g = timed("experts", lambda: self._run_block(expert.blocks[i], key, layers, h, positions, cache))
                ys.append(y)
                logits.append(g)
            h = timed("gate+mix", lambda: mix(ys, logits))
        cache.pos += ids.shape[1]
        (logits,) = timed("head", lambda: self.head([h[:, -1:] if last_only else h]))
        return logits


def mix(ys: list[np.ndarray], logits: list[np.ndarray]) -> np.ndarray:
    """softmax over [backbone, experts...] per token, then the weighted sum of their outputs."""
    g = np.stack(logits, axis=-1)  # (B, T, 1 + N)
    a = np.exp(g - g.max(axis=-1, keepdims=True))
    a /= a.sum(axis=-1, keepdims=True)
    out = a[..., 0:1] * ys[0]
    for j in range(1, len(ys)):
        out += a[..., j : j + 1] * ys[j]
    return out.astype(np.float32)


@dataclass
class Sampling:
    """How the next token is drawn from the logits (the conventions of Hugging Face's generate)."""

    temperature: float = 0.0
    """Softmax temperature, finite and >= 0; 0: greedy (argmax, no randomness)."""
    top_k: int = 0
    """Keep the k likeliest tokens; 0 turns it off, and a k at or above the vocabulary keeps all."""
    top_p: float = 1.0
    """Nucleus: keep the smallest set of likeliest tokens whose probability reaches top_p, in (0, 1]; 1: all."""
    seed: int = 0
    """Seed of the sampler, 0 .. 2**32-1."""

    def __post_init__(self):
        check_number("--temperature", self.temperature, lo=0)
        check_number("--top-k", self.top_k, lo=0, integer=True)
        check_number("--top-p", self.top_p, lo=0, hi=1, lo_open=True)
        check_seed(self.seed)


class SplitMix64:
    """The random stream of both runtimes' samplers, seeded with Sampling.seed: SplitMix64 (Steele, Lea and Flood,
    "Fast splittable pseudorandom number generators", OOPSLA 2014; the generator of Java's SplittableRandom). Its
    few exact 64-bit integer steps give the same draws here and in the native runtime (runtimes/native/src/
    sampling.cpp), which numpy's generators and the C++ library's (other algorithms, other seeding) would not, so a
    seed samples the same tokens on the workstation and on the device."""

    MASK = (1 << 64) - 1

    def __init__(self, seed: int):
        self.state = seed & self.MASK

    def uniform(self) -> float:
        """The next draw in [0, 1): the top 53 bits of the next 64-bit output."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & self.MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & self.MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & self.MASK
        return ((z ^ (z >> 31)) >> 11) * 2.0**-53


def sample(logits: np.ndarray, s: Sampling, rng: SplitMix64) -> int:
    """One token id drawn from the last position's logits (V,) under `s`: the weights exp(z) of the tokens kept,
    their running sum in index order, and the first token whose running sum exceeds one uniform draw times the
    total (inverse transform sampling), step for step as the native runtime draws it."""
    if s.temperature == 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64)
    z = (z - z.max()) / s.temperature  # the largest is 0, so no temperature overflows exp (tiny ones -> greedy)
    if 0 < s.top_k < len(z):  # 0: off; k >= vocabulary: every token (clamped, as Hugging Face and vLLM do)
        kth = np.partition(z, -s.top_k)[-s.top_k]
        z = np.where(z < kth, -np.inf, z)
    w = np.exp(z)
    if s.top_p < 1:
        p = w / np.cumsum(w)[-1]  # the sum in index order, as the native runtime adds
        order = np.argsort(-p, kind="stable")
        before = np.concatenate(([0.0], np.cumsum(p[order])[:-1]))  # the mass of the likelier tokens
        keep = np.zeros(len(p), dtype=bool)
        keep[order[before < s.top_p]] = True  # the smallest set whose mass reaches top_p
        w = np.where(keep, w, 0.0)
    cdf = np.cumsum(w)
    token = int(np.searchsorted(cdf, rng.uniform() * cdf[-1], side="right"))
    return token if token < len(w) else int(np.flatnonzero(w)[-1])  # rounding past the total: the last kept


def generate(
    engine: Engine, prompt: list[int], max_new_tokens: int, sampling: Sampling | None = None,
    stop: int | Iterable[int] | None = None, timer: Callable | None = None,
) -> Iterator[int]:  # fmt: skip
    """Yield new token ids one at a time: one prefill over the prompt, then one-token decode steps; after a token
    of `stop` (an id or several: EOS, a chat template's end of turn), which is yielded, nothing more."""
    stops = {stop} if isinstance(stop, int) else set(stop or ())
    if not prompt:
        raise UserError("the prompt is empty; give at least one token")
    check_number("--max-new-tokens", max_new_tokens, lo=1, integer=True)
    sampling = sampling or Sampling()
    rng = SplitMix64(sampling.seed)
    cache = engine.new_cache(len(prompt) + max_new_tokens)
    logits = engine.forward(np.array([prompt], dtype=np.int64), cache, timer, last_only=True)
    for _ in range(max_new_tokens):
        token = sample(logits[0, -1], sampling, rng)
        yield token
        if token in stops:
            return
        logits = engine.forward(np.array([[token]], dtype=np.int64), cache, timer)
