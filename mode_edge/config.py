"""Typed configuration, one dataclass per concern. Pure Python: the device runtime imports it without torch."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from mode_edge.bundle import FORMATS, QUANTS
from mode_edge.errors import UserError
from mode_edge.names import check_names
from mode_edge.ranges import check_number, check_seed

BLOCK_SIZES = (16, 32, 64, 128, 256)
"""Quantization group sizes onnxruntime's blockwise quantizer supports."""
QUANT_METHODS = ("auto", "rtn", "kquant", "gptq")
"""4-bit rounding methods of `--quant-method` (export/calibrate.py); auto: gptq where it can run, else rtn."""
DEFAULT_LR = {"mode": 1e-3, "full-ft": 5e-5, "lora": 5e-4}
"""Peak learning rate per method. MoDE experts are small copies of backbone layers beside a frozen backbone and take
a high rate (1e-3 reached in 30 steps what 2e-4 reached in 110 on SmolLM2 code); full fine-tuning moves every weight
and forgets at high rates; LoRA's adapters start at zero."""


class _Serialisable:
    """JSON round trip: configs are recorded in every run and read back from it."""

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


ACTIVATIONS = ("silu", "gelu_tanh")
"""Feed-forward gate activations (DecoderConfig.activation)."""


@dataclass(frozen=True)
class DecoderConfig(_Serialisable):
    """Architecture of a decoder-only backbone: the Llama family's, and the fields that make a layer Gemma 3's."""

    vocab_size: int
    """Number of token ids."""
    dim: int
    """Width of the residual stream."""
    n_layers: int
    """Number of transformer layers."""
    n_heads: int
    """Attention heads for queries."""
    n_kv_heads: int
    """Attention heads for keys and values (grouped-query attention when fewer than n_heads)."""
    hidden_dim: int
    """Inner width of the SwiGLU feed-forward."""
    head_dim: int
    """Width of one attention head."""
    rope_theta: float = 10000.0
    """Base of the rotary position embedding."""
    norm_eps: float = 1e-5
    """Epsilon of the RMS norms."""
    tie_embeddings: bool = True
    """Whether the output head shares the token embedding matrix."""
    attn_bias: bool = False
    """Whether the query, key and value projections carry a bias (Qwen2 does)."""
    max_seq_len: int = 2048
    """Longest sequence the rotary table is built for."""
    rope_scaling: dict | None = None
    """Rotary frequency scaling (mode_edge/rope.py): None for plain RoPE, Llama 3.x's {"rope_type": "llama3",
    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"} (Hugging Face's names), or
    Phi-3.5-mini's (and Phi-3's long-context variants') {"rope_type": "longrope", "short_factor": [...] (or
    "long_factor" for a context past the original one), "attention_factor"}, or a GGUF file's divisors per
    frequency (llama.cpp's rope_freqs: Llama 3.x's scaling as the file holds it; linear scaling) {"rope_type":
    "frequency_factors", "factors": [...]}."""
    qk_norm: bool = False
    """Whether queries and keys go through an RMS norm per head before the rotary embedding (Qwen3)."""
    rotary_dim: int | None = None
    """Leading dimensions of each head the rotary embedding turns (Phi-4-mini: 96 of 128, its partial_rotary_factor
    0.75); the rest pass unrotated. None: the whole head."""

    activation: str = "silu"
    """The feed-forward's gate activation: "silu" (SwiGLU, the Llama family) or "gelu_tanh" (GeGLU with GELU's tanh
    approximation, Gemma's gelu_pytorch_tanh)."""
    sandwich_norms: bool = False
    """Gemma 3's layer: RMS norms before and after both the attention and the feed-forward (pre-norm only
    otherwise)."""
    embed_scale: float | None = None
    """What the token embedding's rows are multiplied by on the way in (Gemma: sqrt(dim), in fp32); the tied head
    reads the unscaled table. None: 1."""
    query_scale: float | None = None
    """The attention logits' scale (Gemma 3: query_pre_attn_scalar ** -0.5). None: head_dim ** -0.5."""
    layer_types: list | None = None
    """Per backbone layer, "full_attention" or "sliding_attention" (Gemma 3: five sliding layers to one full); None:
    every layer full. An expert layer has the type of the backbone layer it is copied from."""
    sliding_window: int | None = None
    """Keys a sliding layer's query sees, itself included (Hugging Face's sliding_window)."""
    rope_local_theta: float | None = None
    """The rotary base of the sliding layers (Gemma 3: 10,000 against the full layers' 1,000,000), plain RoPE over
    the same dimensions; None: rope_theta for every layer."""

    OPTIONAL = {"rope_scaling": None, "qk_norm": False, "rotary_dim": None, "activation": "silu",
                "sandwich_norms": False, "embed_scale": None, "query_scale": None, "layer_types": None,
                "sliding_window": None, "rope_local_theta": None}  # fmt: skip
    """Fields left out of `to_dict` at these values, so that a backbone's record, and the fingerprint every pack
    is bound to, stay what they were before the field existed."""

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.OPTIONAL or v != self.OPTIONAL[k]}

    def describe(self) -> str:
        """One line for a person: the shapes and what sets the architecture apart from a plain Llama layer."""
        parts = [f"{self.n_layers} layers x {self.dim}", f"{self.n_heads} query / {self.n_kv_heads} KV heads of "
                 f"{self.head_dim}", f"{'GeGLU' if self.activation == 'gelu_tanh' else 'SwiGLU'} {self.hidden_dim}",
                 f"RoPE base {self.rope_theta:g}"]  # fmt: skip
        if self.rope_scaling:
            parts.append(f"{self.rope_scaling.get('rope_type')} rope scaling")
        if self.rotary_dim:
            parts.append(f"rotary over {self.rotary_dim} of {self.head_dim}")
        if self.qk_norm:
            parts.append("q/k norms")
        if self.sandwich_norms:
            parts.append("sandwich norms")
        if self.layer_types:
            sliding = sum(t == "sliding_attention" for t in self.layer_types)
            parts.append(f"{sliding} of {self.n_layers} layers with a {self.sliding_window}-token sliding window")
        parts.append(f"context {self.max_seq_len}")
        return ", ".join(parts)

    def context_note(self) -> str:
        """What a refusal of a window past the context adds for a LongRoPE backbone at its original context: that
        only a bundle goes past it (`export --context`, with the long factors); "" otherwise."""
        from mode_edge.rope import longrope_set

        if longrope_set(self.rope_scaling) != "short":
            return ""
        return (" (LongRoPE's original context, where its short factors hold: training and `eval --model` stay "
                "within it; `mode-edge export --context` builds a bundle past it, with the long factors)")

    @property
    def rotated(self) -> int:
        """Dimensions of each head the rotary embedding turns (rotary_dim, else head_dim)."""
        return self.rotary_dim or self.head_dim

    def window(self, layer: int) -> int | None:
        """The sliding window of backbone layer `layer` (0-based), None for a full-attention layer."""
        sliding = self.layer_types is not None and self.layer_types[layer] == "sliding_attention"
        return self.sliding_window if sliding else None

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "head_dim", "max_seq_len"):
            check_number(f"DecoderConfig.{name}", getattr(self, name), lo=1, integer=True)
        for name in ("rope_theta", "norm_eps"):
            check_number(f"DecoderConfig.{name}", getattr(self, name), lo=0, lo_open=True)
        from mode_edge.rope import check_rope_scaling

        if self.rotary_dim is not None:
            # (below head_dim: None is the whole head, one spelling, so that fingerprints stay canonical)
            check_number("DecoderConfig.rotary_dim", self.rotary_dim, lo=2, hi=self.head_dim, hi_open=True,
                         integer=True)  # fmt: skip
            if self.rotary_dim % 2:
                raise UserError(f"DecoderConfig.rotary_dim must be even (pairs of dimensions turn), got "
                                f"{self.rotary_dim}")  # fmt: skip
        check_rope_scaling(self.rope_scaling, "DecoderConfig.rope_scaling", self.rotated)
        if self.activation not in ACTIVATIONS:
            raise UserError(f"DecoderConfig.activation must be one of {', '.join(ACTIVATIONS)}, got "
                            f"{self.activation!r}")  # fmt: skip
        for name in ("embed_scale", "query_scale", "rope_local_theta"):
            if getattr(self, name) is not None:
                check_number(f"DecoderConfig.{name}", getattr(self, name), lo=0, lo_open=True)
        if self.layer_types is not None:
            kinds = ("full_attention", "sliding_attention")
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.n_layers or any(
                    t not in kinds for t in self.layer_types):  # fmt: skip
                raise UserError(f"DecoderConfig.layer_types must list {self.n_layers} of {', '.join(kinds)}, got "
                                f"{self.layer_types!r}")  # fmt: skip
        sliding = self.layer_types is not None and "sliding_attention" in self.layer_types
        if sliding:
            check_number("DecoderConfig.sliding_window", self.sliding_window, lo=1, integer=True)
        for name in ("sliding_window", "rope_local_theta"):  # (meaningless without a sliding layer: refused, not
            if not sliding and getattr(self, name) is not None:  # silently ignored)
                raise UserError(f"DecoderConfig.{name} is set but layer_types has no sliding_attention layer; "
                                f"leave it out (null)")  # fmt: skip
        if self.n_heads % self.n_kv_heads:
            raise UserError(
                f"DecoderConfig.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )


@dataclass(frozen=True)
class MoDELayout(_Serialisable):
    """How the frozen backbone is cut into MoDE blocks and how large each expert is."""

    n_blocks: int = 3
    """Contiguous blocks the backbone layers are cut into; each block gets its own gate and expert layers."""
    expert_layers: int = 2
    """Transformer layers per expert per block (the paper's default shape is 3 blocks x 2 layers)."""
    init: str = "copy"
    """'copy': expert layers start as copies of the last layers of their block's backbone slice; 'random'."""
    gate_bias: float = -2.0
    """Initial gate logit of an expert; the backbone's logit is pinned at 0, so the backbone dominates at the start."""
    gate_init: str = "zero"
    """'zero': gate rows start at zero with bias gate_bias (the same weight on every token); 'data': each block's row
    starts as the linear discriminant between the normalised block inputs on the domain and on general text, scaled
    so the gate starts nearly shut on general text and at the zero init's weight on the domain (training/stay_out.py;
    FlexOlmo, arXiv 2507.07024, §3.3)."""

    def __post_init__(self):
        check_number("--blocks", self.n_blocks, lo=1, integer=True)
        check_number("--expert-layers", self.expert_layers, lo=1, integer=True)
        check_number("gate_bias", self.gate_bias)
        if self.init not in ("copy", "random"):
            raise UserError(f"--init must be 'copy' or 'random', got {self.init!r}")
        if self.gate_init not in ("zero", "data"):
            raise UserError(f"--gate-init must be 'zero' or 'data', got {self.gate_init!r}")

    def check_backbone(self, n_layers: int) -> None:
        if n_layers % self.n_blocks:
            divisors = [d for d in range(1, n_layers + 1) if n_layers % d == 0]
            raise UserError(
                f"--blocks {self.n_blocks} does not divide the backbone's {n_layers} layers; choose one of {divisors}"
            )
        per_block = n_layers // self.n_blocks
        if self.init == "copy" and self.expert_layers > per_block:
            raise UserError(
                f"--expert-layers {self.expert_layers} exceeds the {per_block} backbone layers per block that "
                f"--init copy copies from; use at most {per_block} or --init random"
            )

    def block_ranges(self, n_layers: int) -> list[tuple[int, int]]:
        """Backbone layer index ranges [start, end) of each block."""
        self.check_backbone(n_layers)
        per_block = n_layers // self.n_blocks
        return [(i * per_block, (i + 1) * per_block) for i in range(self.n_blocks)]


@dataclass(frozen=True)
class TrainConfig(_Serialisable):
    """Optimisation settings shared by expert training and composition."""

    steps: int = 200
    """Optimizer steps."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    seq_len: int = 256
    """Tokens per sequence."""
    grad_accum: int = 1
    """Micro-batches accumulated into one optimizer step."""
    lr: float = DEFAULT_LR["mode"]
    """Peak learning rate (AdamW) of the weights that learn, gate rows aside."""
    gate_lr: float = 5e-3
    """Peak learning rate of the gate parameters; a few weights per block that must move fast."""
    weight_decay: float = 0.01
    """AdamW weight decay on matrices (not on norms, biases or gates)."""
    warmup_steps: int = 20
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine, as a fraction of the peak."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    seed: int = 0
    """Seed for initialisation and data order."""
    device: str = "cpu"
    """'cpu' or 'cuda'."""
    checkpoint_every: int = 50
    """Steps between resumable checkpoints."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "checkpoint_every"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), lo=1, integer=True)
        check_number("--lr", self.lr, lo=0, lo_open=True)
        check_number("--gate-lr", self.gate_lr, lo=0, lo_open=True)
        check_number("weight_decay", self.weight_decay, lo=0)
        check_number("--warmup-steps", self.warmup_steps, lo=0, integer=True)
        check_number("min_lr_ratio", self.min_lr_ratio, lo=0, hi=1)
        check_number("grad_clip", self.grad_clip, lo=0, lo_open=True)
        check_seed(self.seed)
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"--device must be 'cpu' or 'cuda', got {self.device!r}")

    def check_context(self, max_seq_len: int, note: str = "") -> None:
        """Refuse a --seq-len longer than the backbone's context (its max positions; `note`: check_seq_len's)."""
        check_seq_len(self.seq_len, max_seq_len, note=note)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


@dataclass(frozen=True)
class ParallelConfig(_Serialisable):
    """How a training run under `torchrun` spreads over its processes (training/distributed.py). Not part of a run's
    resume signature: a checkpoint resumes under any of these and at any world size."""

    fsdp: bool = False
    """Shard the trainable layers, their gradients and their AdamW moments over the processes with FSDP2
    (training/fsdp.py) instead of a whole copy on each."""
    placement: str = "data"
    """'data': every process the whole model and its rows of each batch; 'split': every process the whole batch, the
    backbone slice of each MoDE block on rank 0 and the experts on the others, at the same time (the MoDE paper's
    placement; training/placement.py)."""

    def __post_init__(self):
        if self.placement not in ("data", "split"):
            raise UserError(f"--placement must be 'data' or 'split', got {self.placement!r}")
        if self.fsdp and self.placement == "split":
            raise UserError("--fsdp shards data-parallel training; --placement split already keeps each expert on one "
                            "process: choose one of them")  # fmt: skip


@dataclass(frozen=True)
class StayOutConfig(_Serialisable):
    """Stage-1 training that also teaches an expert where to stay out (DESIGN §6): a share of the rows of each batch
    comes from general text, and on those rows a penalty pulls the model back to the frozen backbone while the
    domain rows train with the ordinary language-model loss (Neutral Residues, arXiv 2410.02744; CITI, 2409.13202)."""

    share: float = 0.25
    """Fraction of training rows drawn from the general corpus (spread evenly over the steps)."""
    weight: float = 1.0
    """Weight of the stay-out penalty against the domain rows' cross-entropy."""
    penalty: str = "delta"
    """'delta': relative L1 size of each block's change to the backbone's block output, sum_j a_j * (f_j(x) -
    f_bb(x)), on general tokens (no extra forward); 'kl': KL divergence from the frozen backbone's next-token
    distribution on general rows (one extra backbone forward over those rows). Measured on SmolLM2 math (README):
    the same in-domain gain, off-domain changes as small or smaller with delta, within the intervals."""

    def __post_init__(self):
        check_number("--general-share", self.share, lo=0, hi=1, lo_open=True, hi_open=True)
        check_number("--stay-out-weight", self.weight, lo=0)
        if self.penalty not in ("kl", "delta"):
            raise UserError(f"--stay-out must be 'kl' or 'delta', got {self.penalty!r}")


@dataclass(frozen=True)
class ExportConfig(_Serialisable):
    """What `mode-edge export` writes."""

    formats: tuple = ("onnx",)
    """Graph formats: 'onnx' (onnxruntime) and/or 'executorch' (.pte, XNNPACK)."""
    quant: str = "int8"
    """Weight precision: 'fp32', 'int8', 'int4' or 'mixed'. ONNX: weight-only in groups of block_size (MatMulNBits);
    'mixed' is int4 with the value and down projections of llama.cpp's Q4_K_M layers at 8 bits
    (export/mixed_precision.py; ONNX only). .pte: 8-bit dynamic per-token activations with 8-bit per-channel or 4-bit
    grouped weights (XNNPACK)."""
    block_size: int = 32
    """Weights per quantization group (ONNX int8 and int4, .pte int4): 16, 32, 64, 128 or 256."""
    experts: list | None = None
    """Experts to export (None: all in the run)."""
    overwrite: bool = False
    """Replace an existing bundle."""
    accuracy_level: int | str = "auto"
    """onnxruntime MatMulNBits compute type for the weights the exporter rounds: 0 (unset) / 1 fp32, 2 fp16, 3 bf16,
    4 int8 activations per block (fastest on CPUs with dot-product instructions, and the lossiest), or 'auto': 4 or
    0 for each graph by measured error against fp32 (export/accuracy_levels.py)."""
    base_accuracy_level: int | str = "auto"
    """MatMulNBits compute type of the weights written from source blocks (the GGUF's own, the shared 8-bit
    embedding of the head): 0 keeps the base exactly the trained model (fp32 arithmetic on the blocks), 4 multiplies
    in int8 (faster; rounds each block of activations); 'auto' (`base_levels`): 0 for a source's blocks, 4 (or
    --accuracy-level's number) for an embedding rounded here."""
    source_blocks: bool = True
    """int8 / int4 / mixed: write each backbone weight from the blocks of its quantized source (a GGUF's Q4_0,
    Q4_1 or Q8_0 rows; .pte graphs: the 4-bit ones) instead of rounding it again, so the base equals the model that
    was trained (export/source_blocks.py, export/executorch_graphs.SourceBlockLinear)."""
    quant_method: str = "auto"
    """int4 and mixed: how the 4-bit weights without source blocks (experts; a backbone from fp16/fp32
    weights) are rounded: 'rtn' round-to-nearest, 'kquant' llama.cpp's scale/minimum search (ONNX only), 'gptq'
    calibrated on each expert's training text (export/calibrate.py; the .pte graphs take GPTQ's blocks as they are),
    'auto' gptq when every expert's text is at hand and the block size is 32, else rtn (measured: GPTQ's expert
    graphs err 1.5-4x less than RTN's; benchmarks/results/quant_methods.md). int8 (and mixed's 8-bit layers) are
    always round-to-nearest."""
    pte_context: int = 2048
    """ExecuTorch: the longest context (cached positions) the .pte graphs take, at most the backbone's. ExecuTorch
    plans activation memory for it up front (the present KV cache of every layer), so it is bounded here."""
    calibration_data: str | None = None
    """--quant-method gptq: a prepared corpus to calibrate every expert on (None: each expert's own training text)."""
    context: int | None = None
    """The bundle's context in tokens, the longest its runtimes cache (None: the backbone's default,
    training/backbones.load_backbone). Past a LongRoPE backbone's original context the bundle takes its long
    factors at every position (mode_edge/rope.py)."""

    def __post_init__(self):
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats:
            raise UserError(f"--format must list onnx and/or executorch, got {','.join(self.formats) or 'nothing'}")
        if self.quant not in QUANTS:
            raise UserError(f"--quant must be fp32, int8, int4 or mixed, got {self.quant!r}")
        if self.quant == "mixed" and self.quant_method == "kquant":
            raise UserError("--quant mixed writes its 8-bit layers beside the 4-bit ones, which onnxruntime's k-quant "
                            "path does not keep; pass --quant-method gptq or rtn with mixed, or --quant int4 for "
                            "kquant")  # fmt: skip
        if self.quant_method == "kquant" and "onnx" not in self.formats and self.quant == "int4":
            raise UserError("--quant-method kquant is onnxruntime's k-quant search, for ONNX bundles; ExecuTorch's "
                            "4-bit weights take gptq or rtn (or add onnx to --format)")  # fmt: skip
        if self.quant == "mixed" and "executorch" in self.formats:
            raise UserError("--quant mixed is for ONNX bundles (ExecuTorch's XNNPACK takes one scheme a graph); "
                            "pass --format onnx, or --quant int4 for ExecuTorch")  # fmt: skip
        if self.experts is not None:
            check_names(self.experts, "--experts")
        if not isinstance(self.block_size, numbers.Integral) or self.block_size not in BLOCK_SIZES:
            raise UserError(f"--block-size must be one of {', '.join(map(str, BLOCK_SIZES))} (a power of two that "
                            f"onnxruntime's quantizer takes), got {self.block_size!r}")  # fmt: skip
        check_number("--pte-context", self.pte_context, lo=64, integer=True)
        if self.context is not None:
            check_number("--context", self.context, lo=64, integer=True)  # (training/backbones.MIN_CONTEXT)
        if self.quant_method not in QUANT_METHODS:
            raise UserError(f"--quant-method must be {', '.join(QUANT_METHODS)}, got {self.quant_method!r}")
        if self.quant_method == "gptq" and self.quant in ("int4", "mixed") and self.block_size != 32:
            raise UserError(f"--quant-method gptq writes blocks of 32 weights (GGUF Q4_1's layout), got --block-size "
                            f"{self.block_size}; pass --block-size 32 or --quant-method rtn")  # fmt: skip
        for option, level in (("--accuracy-level", self.accuracy_level),
                              ("--base-accuracy-level", self.base_accuracy_level)):  # fmt: skip
            if level == "auto":
                continue
            if not isinstance(level, numbers.Integral) or isinstance(level, bool) or not 0 <= level <= 4:
                raise UserError(f"{option} must be 0, 1, 2, 3 or 4 (onnxruntime's MatMulNBits compute types) or auto, "
                                f"got {level!r}")  # fmt: skip

    def base_levels(self) -> tuple[int, int]:
        """The compute types of (a source's own blocks, the embedding rounded here to 8-bit blocks, which a tied head
        multiplies). Under 'auto' a source's blocks compute in fp32, so that the base stays the trained model, and an
        embedding rounded here (no source holds it: a checkpoint without quantized source, --requantize-base, a GGUF
        whose embedding is another block type) at 4, or at --accuracy-level where that is a number: nothing exact is
        kept there, and in fp32 the head took a quarter of a decode step. Measured on the SmolLM2 int4 bundle with
        --requantize-base and the code expert: the head 1.46 -> 0.94 ms a decode step (5.96 -> 5.65 ms in all, one
        run of each), and the change against PyTorch (`mode-edge eval --bundle`, 4,096 tokens per domain) -1.88 /
        -1.25 / -7.86 / -3.98 points with the head at level 0, -1.71 / -1.37 / -8.01 / -3.78 at level 4."""
        if self.base_accuracy_level != "auto":
            return self.base_accuracy_level, self.base_accuracy_level
        return 0, 4 if self.accuracy_level == "auto" else self.accuracy_level


def check_seq_len(seq_len: int, max_seq_len: int, option: str = "--seq-len", note: str = "") -> None:
    """A window of `seq_len` tokens must fit the backbone's rotary table (its max positions); `note` follows the
    context in the refusal (DecoderConfig.context_note)."""
    check_number(option, seq_len, lo=1, integer=True)
    if seq_len > max_seq_len:
        raise UserError(f"{option} {seq_len} exceeds the backbone's context of {max_seq_len} tokens{note}; "
                        f"use {option} 1..{max_seq_len}")  # fmt: skip
