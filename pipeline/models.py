"""Model and tokenizer loading (local directory or hub id), content hashes, and the toy models."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.config import ChatConfig, ConfigError, ToyModelConfig
from pipeline.shards import files_sha256

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
MANIFEST = "manifest.json"
"""File the models stage writes: where each role's model lives and its provenance."""


def resolve_model_dir(name_or_path: str, key: str = "models.teacher/student") -> Path:
    """A local model directory for a path or a hub id (downloaded into the HF cache if needed); `key` is
    the params key that named it, for the error."""
    from pipeline.config import ConfigError

    path = Path(name_or_path)
    if path.is_dir():
        return path
    fix = f"Fix: set {key} to an existing model directory or a hub model id (namespace/name)"
    # A path whose parent directory exists, or with more parts than a hub id has, is a local path.
    local = path.is_absolute() or name_or_path.startswith(".") or len(path.parts) > 2
    if local or (len(path.parts) == 2 and path.parent.is_dir()):
        raise ConfigError(f"{key}: model directory {path} does not exist (looked in {Path.cwd()}). {fix}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path))
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"{key}: {name_or_path!r} is no local directory (looked in {Path.cwd()}) and the hub "
                          f"lookup failed ({first_line}). {fix}") from error


def weights_hash(model_dir: Path) -> str:
    """sha256 over the weight files: identifies a teacher exactly, whatever its name. A safetensors file
    whose header does not cover it (truncated, a partial copy) is refused here, before any stage loads it."""
    from safetensors import SafetensorError, safe_open

    files = [p for p in Path(model_dir).iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{model_dir}: no weight files ({', '.join(WEIGHT_SUFFIXES)}). Fix: point the "
                                f"models key at a directory written by save_pretrained, weights included")
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), "pt"):
                    pass
            except SafetensorError as error:
                raise FileNotFoundError(f"{path}: not a complete safetensors file ({error}). Fix: copy or "
                                        f"download the model again") from error
    return files_sha256(sorted(files))


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 of the tokenizer's token-to-id mapping (the thing that must match across models)."""
    tok = load_tokenizer(model_dir)
    vocab = json.dumps(sorted(tok.get_vocab().items()), separators=(",", ":"))
    return hashlib.sha256(vocab.encode()).hexdigest()


def describe(model_id: str, model_dir: Path) -> dict:
    """Provenance of one model: id, directory, weights and tokenizer hashes."""
    return {
        "id": model_id,
        "path": str(model_dir),
        "weights_sha256": weights_hash(model_dir),
        "tokenizer_sha256": tokenizer_hash(model_dir),
    }


def model_config(model_dir):
    """The transformers config of a local model directory (vocab_size, max_position_embeddings, ...)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(model_dir))


def check_prompt_lengths(prompts: list[dict], encoded: list[list[int]], key: str, max_new_tokens: int, model_dir,
                         prompts_dir) -> None:
    """Refuse, before any shard is sampled or replaced, a prompt that with `max_new_tokens` (params `key`) does
    not fit the model's positions: it would fail deep in the engine, or allocate for a sequence the model
    cannot attend over."""
    from pipeline.config import ConfigError

    limit = getattr(model_config(model_dir), "max_position_embeddings", None)
    for row, (prompt, ids) in enumerate(zip(prompts, encoded)):
        if limit and len(ids) + max_new_tokens > limit:
            fix = (f"set prompts.max_prompt_tokens to at most {limit - max_new_tokens} (the prompts stage then drops "
                   f"longer prompts) or lower {key}" if max_new_tokens < limit else f"lower {key} below {limit}")
            raise ConfigError(
                f"{prompts_dir}: prompt {row} of the split (prompt_id {prompt['prompt_id']!r}) has {len(ids)} tokens; "
                f"with {key} {max_new_tokens} that exceeds the {limit} positions of {model_dir}. Fix: {fix}")


def load_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_model(model_dir, dtype: str = "float32", device: str = "auto"):
    """A causal LM from a local directory, in eval mode on the chosen device."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return model.to(pick_device(device)).eval()


def build_toy_model(cfg: ToyModelConfig, tokenizer, seed: int):
    """A freshly initialised Llama-style model sized by `cfg` (head_dim 64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = cfg.num_heads
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=64,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def save_model(model, tokenizer, out_dir: Path) -> None:
    """Save weights, config and tokenizer together so the directory loads like a hub model."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def read_manifest(models_dir) -> dict:
    """The models stage's manifest, with each role's path resolved against the manifest's directory."""
    path = Path(models_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the models stage first (dvc repro models)")
    manifest = json.loads(path.read_text())
    for role in [*(v for k, v in manifest.items() if k != "teachers"), *manifest.get("teachers", {}).values()]:
        local = Path(models_dir) / role["path"]
        role["path"] = str(local) if local.is_dir() else role["path"]
    return manifest


def domain_teachers(manifest: dict) -> dict[str | None, dict]:
    """The models stage's teachers by domain (models.teachers); key None: the one teacher of every domain."""
    return dict(manifest["teachers"]) if "teachers" in manifest else {None: manifest["teacher"]}


def teacher_for(teachers: dict[str | None, dict], domain: str | None, where) -> dict:
    """The teacher of `domain` among `teachers` (domain_teachers); `where` names the prompts, for the error."""
    if None in teachers:
        return teachers[None]
    if domain not in teachers:
        raise ConfigError(f"{where}: a prompt of domain {domain!r}, which models.teachers does not map to a teacher "
                          f"(it maps {sorted(teachers)}). Fix: rerun the models stage on these prompts (dvc repro "
                          f"models), mapping every domain")
    return teachers[domain]


def encode_prompt(tokenizer, prompt: str, chat: ChatConfig | None = None) -> list[int]:
    """Prompt token ids as the model sees them: the plain text with the tokenizer's own special tokens, or with
    `chat.template` a user turn (after the system prompt) in the tokenizer's chat template, ending with the
    generation prompt. Every stage that encodes prompts calls this, so they all show the models the same ids."""
    if chat is None or not chat.template:
        return tokenizer(prompt)["input_ids"]
    if not tokenizer.chat_template:
        where = tokenizer.name_or_path or "the toy tokenizer (models: toy)"
        raise ConfigError(
            f"prompts.chat.template is true, but the tokenizer of {where} has no chat template. Fix: set "
            f"prompts.chat.template: false to encode prompts as plain text (base models, the toy task), or use a "
            f"chat or instruct model, or add a chat_template to {where}/tokenizer_config.json."
        )
    messages = [{"role": "user", "content": prompt}]
    if chat.system_prompt is not None:
        messages.insert(0, {"role": "system", "content": chat.system_prompt})
    # Only when set: a template that reads enable_thinking has its own default for it (Qwen3: on).
    extra = {} if chat.enable_thinking is None else {"enable_thinking": chat.enable_thinking}
    # The template writes the special tokens itself (apply_chat_template adds none); return_dict=False gives
    # the ids alone in transformers 4 and 5 alike.
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False,
                                              **extra))


def encode_response(tokenizer, response: str) -> list[int]:
    """Response token ids ending with EOS, so a trained model learns to stop."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


PROVENANCE = "provenance.json"
"""Written beside a trained model's weights: what it was trained from and with (resolved config)."""


def write_provenance(model_dir, provenance: dict) -> None:
    (Path(model_dir) / PROVENANCE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def read_provenance(model_dir) -> dict:
    path = Path(model_dir) / PROVENANCE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {model_dir} was not written by a training stage of this pipeline")
    return json.loads(path.read_text())


def identity(info: dict) -> dict:
    """A model's provenance without its local path (paths differ between machines, hashes do not)."""
    return {k: v for k, v in info.items() if k != "path"}
