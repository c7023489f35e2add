"""Write the prompts: disjoint splits for teacher training, SFT, OPD and evaluation.

    python -m stages.prompts --params params.yaml --out data/prompts

With `prompts.source: toy` (the default) the prompts come from the embedded toy task
(pipeline/toy_task.py), each with its reference answer, sized by the `task` section, in each domain of
`task.domains` (the domains alternating row by row in each split). Otherwise they are
read from your source (a .jsonl or .parquet file, a datasets save_to_disk directory, or a hub dataset
id), taking the columns `prompts.*_column` name (`prompts.domain_column`: each prompt's domain). Bad rows
(a JSONL line that is not UTF-8 or not a JSON object; a prompt that is not a string, is empty or is over
`prompts.max_prompt_tokens`; an answer that is neither a string nor null; an id that is not a string or
integer, or is taken; a domain that is not a non-empty string) are skipped with one warning per kind, or
with `prompts.strict` stop the stage, naming file, row and column. A repeated
prompt keeps its first row. The usable prompts go to the splits in a seeded order of their ids, eval
first, so a prompt is in one split only.

The chat settings (`prompts.chat`) are recorded in the output: every later stage encodes prompts with
them (read_chat), so SFT data, rollouts, refresh rounds and evaluation show the models the same ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterator, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from data_schemas import SchemaError
from data_schemas import prompts as prompts_schema
from pipeline import cli, models, shards, toy_task
from pipeline.config import ConfigError, PromptsConfig, TaskConfig, load_section
from pipeline.provenance import stage_provenance

log = logging.getLogger("prompts")
SPLITS = ("teacher_train", "sft", "opd", "eval")
FILL_ORDER = ("eval", "sft", "opd", "teacher_train")
"""Splits take their prompts in this order: eval first, so resizing another split never moves a prompt
into or out of the held-out set."""
BAD_ROWS = {
    "invalid_utf8": "lines that are not valid UTF-8",
    "invalid_json": "lines that are not a JSON object",
    "wrong_type": "rows with a value of the wrong type",
    "empty_prompt": "rows with an empty prompt",
    "too_long": "prompts over prompts.max_prompt_tokens",
    "duplicate_id": "rows whose id an earlier prompt has",
}
"""Kinds of bad rows, and what their summary calls them."""
EXAMPLES_PER_KIND = 3
MISSING = object()
"""A column a JSONL row does not have."""


def prompt_id(prompt: str) -> str:
    """Content-addressed, so the same prompt has the same id in every run and split."""
    return hashlib.sha1(prompt.encode()).hexdigest()[:16]


class BadRows:
    """Bad rows of a source: with `strict` the first one raises; otherwise they are counted, and
    `summary()` logs one warning per kind with a few examples."""

    def __init__(self, source: str, strict: bool):
        self.source, self.strict = source, strict
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, kind: str, where: str, column: str | None, expected: str, found: str, fix: str) -> None:
        at = where + (f", column '{column}'" if column else "")
        if self.strict:
            raise SchemaError(f"{self.source}: {at}: expected {expected}, found {found}. Fix: {fix}; "
                              f"or set prompts.strict: false to skip bad rows", self.source)
        self.counts[kind] += 1
        if len(self.examples[kind]) < EXAMPLES_PER_KIND:
            self.examples[kind].append(f"{at}: {found}")

    def summary(self) -> dict[str, int]:
        for kind, count in self.counts.items():
            examples = "; ".join(self.examples[kind])
            log.warning("%s: skipped %d %s, e.g. %s", self.source, count, BAD_ROWS[kind], examples)
        return dict(self.counts)


def _shown(value) -> str:
    """A value as an error message shows it: its type and a short repr."""
    if value is MISSING:
        return "no such key"
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


# -- reading a source: (where, record) per row, in file order -----------------------------------------


def _jsonl_records(path: Path, bad: BadRows) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"line {number}"
            try:
                text = raw.decode("utf-8-sig")  # -sig: a byte-order mark some editors write is not part of the row
            except UnicodeDecodeError as error:
                found = f"byte {raw[error.start]:#04x} at byte {error.start}"
                bad.add("invalid_utf8", where, None, "UTF-8 text", found,
                        "re-encode the file as UTF-8 (iconv -t UTF-8)")
                continue
            if not text.strip():
                continue  # blank lines (a trailing one, say) hold no row
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                bad.add("invalid_json", where, None, "a JSON object", f"invalid JSON ({error.msg} at char {error.pos})",
                        "write one JSON object per line")
                continue
            if not isinstance(record, dict):
                bad.add("invalid_json", where, None, "a JSON object", f"a JSON {type(record).__name__}",
                        "write one JSON object per line")
                continue
            yield where, record


def _check_columns(found: list[str], columns: list[str], source: str) -> None:
    missing = [column for column in columns if column not in found]
    if missing:
        raise ConfigError(f"{source}: no column(s) {missing}; its columns are {found}. Fix: set prompts.prompt_column, "
                          f"answer_column (null: no answers) and id_column (null: hash the prompt) to its column names")


def _table_records(rows) -> Iterator[tuple[str, dict]]:
    for index, record in enumerate(rows):
        yield f"row {index}", record


def open_source(cfg: PromptsConfig, bad: BadRows) -> tuple[Iterator[tuple[str, dict]], str | None]:
    """The source's rows as (where, record), in order, and a fingerprint of its content (for provenance).

    An existing .jsonl or .parquet file, or a directory written by datasets' save_to_disk; anything
    else that does not look like a local path is a hub dataset id.
    """
    columns = [c for c in (cfg.prompt_column, cfg.answer_column, cfg.id_column, cfg.domain_column) if c is not None]
    path = Path(cfg.source)
    if path.is_file() and path.suffix == ".jsonl":
        return _jsonl_records(path, bad), shards.file_sha256(path)
    if path.is_file() and path.suffix == ".parquet":
        names = pq.read_schema(path).names
        _check_columns(names, columns, cfg.source)
        return _table_records(pq.read_table(path, columns=columns).to_pylist()), shards.file_sha256(path)
    if path.is_file():
        raise ConfigError(f"prompts.source {cfg.source}: unsupported file type {path.suffix!r}; give a .jsonl or "
                          f".parquet file, a directory written by datasets' save_to_disk, or a hub dataset id")
    looks_local = (path.suffix in (".jsonl", ".parquet") or path.is_absolute() or cfg.source.startswith(".")
                   or len(path.parts) > 2 or (len(path.parts) == 2 and path.parent.is_dir()))
    if not path.is_dir() and looks_local:
        raise ConfigError(f"prompts.source {cfg.source}: no such file or directory (looked for a .jsonl or .parquet "
                          f"file or a save_to_disk directory, from {Path.cwd()}). Fix: correct the path, or give a hub "
                          f"dataset id (namespace/name)")
    import datasets  # slow to import; only for these sources

    if path.is_dir():
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as error:
            raise ConfigError(f"prompts.source {cfg.source}: a directory, but not one written by datasets' "
                              f"save_to_disk (no dataset_info.json, state.json or dataset_dict.json in it). Fix: point "
                              f"prompts.source at a .jsonl or .parquet file inside it, or at a save_to_disk "
                              f"directory") from error
        if isinstance(dataset, datasets.DatasetDict):
            if cfg.hf_split not in dataset:
                raise ConfigError(f"prompts.source {cfg.source} has splits {list(dataset)}, not prompts.hf_split "
                                  f"{cfg.hf_split!r}. Fix: set prompts.hf_split to one of them")
            dataset = dataset[cfg.hf_split]
    else:
        dataset = datasets.load_dataset(cfg.source, cfg.hf_config, split=cfg.hf_split)
    _check_columns(dataset.column_names, columns, cfg.source)
    # _fingerprint: datasets' own hash of the data and every transform applied to it
    return _table_records(dataset.select_columns(columns)), dataset._fingerprint


# -- checking rows and drawing the splits --------------------------------------------------------------


class SourceRow(NamedTuple):
    where: str
    prompt: str
    answer: str | None
    prompt_id: str
    domain: str | None = None


def check_row(cfg: PromptsConfig, where: str, record: dict, bad: BadRows, tokenizer) -> SourceRow | None:
    """The row if it is usable, else None (reported to `bad`)."""
    prompt = record.get(cfg.prompt_column, MISSING)
    if not isinstance(prompt, str):
        bad.add("wrong_type", where, cfg.prompt_column, "a string", _shown(prompt),
                "make the prompt text, or point prompts.prompt_column at the column that holds it")
        return None
    if not prompt.strip():
        bad.add("empty_prompt", where, cfg.prompt_column, "a non-empty prompt", _shown(prompt),
                "fill in the prompt or drop the row")
        return None
    answer = None
    if cfg.answer_column is not None:
        answer = record.get(cfg.answer_column, MISSING)
        if answer is not None and not isinstance(answer, str):
            bad.add("wrong_type", where, cfg.answer_column, "a string or null", _shown(answer),
                    'write answers as strings (42 -> "42"), or set prompts.answer_column: null')
            return None
    id_ = prompt_id(prompt)
    if cfg.id_column is not None:
        value = record.get(cfg.id_column, MISSING)
        if isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
            bad.add("wrong_type", where, cfg.id_column, "a non-empty string or an integer", _shown(value),
                    "give every row an id, or set prompts.id_column: null to hash the prompt text")
            return None
        id_ = str(value)
    domain = None
    if cfg.domain_column is not None:
        domain = record.get(cfg.domain_column, MISSING)
        if not isinstance(domain, str) or not domain.strip():
            bad.add("wrong_type", where, cfg.domain_column, "a non-empty string (the prompt's domain)", _shown(domain),
                    "give every row its domain, or set prompts.domain_column: null (one unnamed domain)")
            return None
    if cfg.max_prompt_tokens is not None:
        length = len(models.encode_prompt(tokenizer, prompt, cfg.chat))
        if length > cfg.max_prompt_tokens:
            bad.add("too_long", where, cfg.prompt_column, f"at most {cfg.max_prompt_tokens} tokens", f"{length} tokens",
                    "raise prompts.max_prompt_tokens, or shorten or drop the prompt")
            return None
    return SourceRow(where, prompt, answer, id_, domain)


def usable_rows(cfg: PromptsConfig, records, bad: BadRows, tokenizer) -> tuple[list[SourceRow], int]:
    """The usable rows in source order, each prompt once (its first row), and the number of repeats dropped."""
    rows, seen_prompts, seen_ids, repeats = [], set(), {}, 0
    for where, record in records:
        row = check_row(cfg, where, record, bad, tokenizer)
        if row is None:
            continue
        if row.prompt in seen_prompts:
            repeats += 1
            continue
        if row.prompt_id in seen_ids:
            bad.add("duplicate_id", where, cfg.id_column, "a unique id", f"{row.prompt_id!r} again (first at "
                    f"{seen_ids[row.prompt_id]}, another prompt)", "give every prompt its own id, or set "
                    "prompts.id_column: null to hash the prompt text")
            continue
        seen_prompts.add(row.prompt)
        seen_ids[row.prompt_id] = where
        rows.append(row)
    return rows, repeats


def assign_splits(ids: list[str], cfg: PromptsConfig) -> dict[str, list[int]]:
    """Indices into `ids` of each split's prompts, in a seeded order of the ids (so the same prompts get
    the same splits whatever their order in the source); prompts left over are in no split."""
    sizes = {name: getattr(cfg.splits, name) for name in FILL_ORDER}
    if any(isinstance(size, float) for size in sizes.values()):
        sizes = {name: int(size * len(ids) + 1e-9) for name, size in sizes.items()}  # epsilon: 0.29 * 100 is 29
    if sum(sizes.values()) > len(ids):
        raise ConfigError(f"prompts.splits ask for {sum(sizes.values())} prompts ({sizes}), but {cfg.source} has "
                          f"{len(ids)} usable ones. Fix: lower the counts, or give fractions")
    empty = [name for name in ("sft", "opd", "eval") if sizes[name] == 0]
    if empty:
        raise ConfigError(f"prompts.splits leave {empty} without a prompt ({len(ids)} usable in {cfg.source}). "
                          f"Fix: raise their fractions or counts, or use a source with more usable prompts")
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{cfg.seed}:{ids[i]}".encode()).digest())
    splits, start = {}, 0
    for name in FILL_ORDER:
        splits[name] = order[start:start + sizes[name]]
        start += sizes[name]
    return splits


# -- the stage -----------------------------------------------------------------------------------------


def _toy_prompts(task: TaskConfig) -> tuple[pa.Table, dict, dict[str, int]]:
    counts = {
        "teacher_train": task.teacher_train_prompts,
        "sft": task.sft_prompts,
        "opd": task.opd_prompts,
        "eval": task.eval_prompts,
    }
    drawn = {domain: toy_task.make_examples(sum(counts.values()), task.n_digits, task.seed, domain)
             for domain in task.domains}
    # each split's rows alternate between the domains, so that every shard and batch mixes them
    rows, start = [], 0
    for split in SPLITS:
        rows += [(split, domain, *drawn[domain][start + i]) for i in range(counts[split]) for domain in task.domains]
        start += counts[split]
    table = pa.table(
        {
            "prompt_id": [prompt_id(p) for _, _, p, _ in rows],
            "prompt": [p for _, _, p, _ in rows],
            "answer": [a for _, _, _, a in rows],
            "split": [split for split, _, _, _ in rows],
            "domain": [domain for _, domain, _, _ in rows],
        }
    )
    counts = {split: count * len(task.domains) for split, count in counts.items()}
    return table, stage_provenance("prompts", task, task=toy_task.TASK), counts


def _source_prompts(cfg: PromptsConfig, tokenizer) -> tuple[pa.Table, dict, dict[str, int]]:
    bad = BadRows(cfg.source, cfg.strict)
    records, fingerprint = open_source(cfg, bad)
    rows, repeats = usable_rows(cfg, records, bad, tokenizer)
    skipped = bad.summary()
    if repeats:
        log.info("%s: %d repeated prompts dropped (each keeps its first row)", cfg.source, repeats)
    splits = assign_splits([row.prompt_id for row in rows], cfg)
    chosen = [(split, rows[i]) for split in SPLITS for i in splits[split]]
    table = pa.table(
        {
            "prompt_id": [row.prompt_id for _, row in chosen],
            "prompt": [row.prompt for _, row in chosen],
            "answer": pa.array([row.answer for _, row in chosen], pa.string()),  # typed: all null without answers
            "split": [split for split, _ in chosen],
            "domain": pa.array([row.domain for _, row in chosen], pa.string()),
        }
    )
    counts = {split: len(splits[split]) for split in SPLITS}
    provenance = stage_provenance("prompts", cfg, source=cfg.source, source_fingerprint=fingerprint,
                                  rows={"usable": len(rows), "repeats": repeats, "skipped": skipped,
                                        "unused": len(rows) - sum(counts.values())})
    return table, provenance, counts


def run(task: TaskConfig, out: Path, cfg: PromptsConfig | None = None, student: str = "toy") -> Path:
    """Write the prompts of `cfg.source` (default: the toy task sized by `task`) to `out`; `student` is
    models.student, whose tokenizer measures prompt lengths and checks the chat template."""
    cfg = cfg or PromptsConfig()
    tokenizer = None
    if cfg.chat.template or cfg.max_prompt_tokens is not None:
        # Lengths are measured here, once, as the models will see the prompts (student's tokenizer, chat
        # template included): measured later, stage by stage, stages could drop different prompts and the
        # eval split would shrink after it was drawn. The toy tokenizer is built here and a real one is a
        # few files, so this stage needs no model.
        tokenizer = toy_task.build_tokenizer() if student == "toy" else models.load_tokenizer(student)
        models.encode_prompt(tokenizer, "1", cfg.chat)  # a missing chat template fails now, before any model runs
    table, provenance, counts = _toy_prompts(task) if cfg.source == "toy" else _source_prompts(cfg, tokenizer)
    if tokenizer is not None:
        provenance["tokenizer"] = student
    if cfg.chat.template:
        provenance["chat"] = dataclasses.asdict(cfg.chat)  # absent: plain text, as before chat templates existed
    shards.fill_shards(out, 1, 1, lambda i, rows: table, prompts_schema, provenance, can_replace=False)
    log.info("%s: %s prompts", out, ", ".join(f"{counts[s]} {s}" for s in SPLITS))
    return out


def main(argv=None):
    args = cli.stage_args("prompts", __doc__, argv, "out")
    run(load_section("task", args.params), args.out, load_section("prompts", args.params),
        load_section("models", args.params).student)
    cli.summary(args)


if __name__ == "__main__":
    main()
