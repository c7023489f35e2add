"""Multi-teacher distillation: the subtraction domain's exact answers, the params, prompts with domains (and
version-1 prompts without), each stage's per-domain teacher on the tiny two-domain pipeline (bench/multi_teacher.py's
`both` arm), the cache's per-row teacher (and version-2 caches without it), the guard's refusals domain by domain,
refresh rounds, and evaluate's per-domain numbers."""

from __future__ import annotations

import dataclasses
import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from data_schemas import prompts as prompts_schema
from data_schemas import sft_samples, teacher_cache
from pipeline import cache, models, shards, toy_task
from pipeline.config import ConfigError, ModelsConfig, PromptsConfig, TaskConfig, from_dict
from pipeline.inspect_cache import summarise
from pipeline.prompts import read_rows, read_split
from stages import evaluate, opd, prompts, teacher_logprobs
from stages import models as models_stage
from tests.conftest import TINY_PARAMS, section

TASK = dataclasses.replace(section("task"), domains=["add", "sub"])


@pytest.fixture(scope="module")
def both(multi_seed_root):
    return multi_seed_root / "both" / "seed0"


@pytest.fixture(scope="module")
def two_domain_prompts(tmp_path_factory):
    out = tmp_path_factory.mktemp("prompts") / "p"
    prompts.run(TASK, out)
    return out


# --- the subtraction domain and the params -------------------------------------------------------------


@pytest.mark.parametrize("a, b", [(589, 347), (1000, 1), (500, 500), (321, 0), (999, 998)])
def test_subtraction_is_worked_column_by_column_and_verified_by_its_difference(a, b):
    prompt = toy_task.make_prompt(a, b, 4, "sub")
    assert prompt.endswith(":") and toy_task.domain_of(prompt) == "sub"
    digits = [((a // 10**i) % 10, (b // 10**i) % 10) for i in range(4)]
    borrow, steps = 0, []
    for x, y in digits:  # the schoolbook rule, written out independently
        d = x - y - borrow
        borrow = int(d < 0)
        steps.append((borrow, d % 10))
    assert toy_task.solve(prompt) == "".join(f"{c}{u};" for c, u in steps)
    assert toy_task.solve(prompt, "units_first") == "".join(f"{u}{c}:" for c, u in steps)
    for style in toy_task.STYLES:
        assert toy_task.final_answer(toy_task.solve(prompt, style)) == a - b
        assert toy_task.is_correct(toy_task.solve(prompt, style), toy_task.solve(prompt))
    assert toy_task.solve("97,84,53:") == "02;04;02;"  # 589 - 347, the docstring's example


def test_the_add_domain_draws_the_prompts_it_always_drew_and_sub_its_own():
    assert toy_task.make_examples(50, 3, 7) == toy_task.make_examples(50, 3, 7, "add")
    subs = toy_task.make_examples(50, 3, 7, "sub")
    assert all(toy_task.domain_of(p) == "sub" and toy_task.final_answer(a) >= 0 for p, a in subs)
    assert not {p for p, _ in subs} & {p for p, _ in toy_task.make_examples(50, 3, 7)}


def test_domains_and_teachers_params_are_checked():
    for bad in (["mul"], [], ["add", "add"]):
        with pytest.raises(ConfigError, match="task.domains must list distinct domains"):
            TaskConfig(domains=bad)
    cfg = from_dict(ModelsConfig, {"teachers": {"add": "toy", "sub": "toy:add"}}, "models")
    assert cfg.teachers == {"add": "toy", "sub": "toy:add"}
    with pytest.raises(ConfigError, match=r"models.teachers.sub: expected str, found 3"):
        from_dict(ModelsConfig, {"teachers": {"add": "toy", "sub": 3}}, "models")
    with pytest.raises(ConfigError, match="both non-empty"):
        ModelsConfig(teachers={"add": ""})
    with pytest.raises(ConfigError, match=r"\['domain_column'\] apply to your own prompt source"):
        PromptsConfig(domain_column="domain")


def test_teachers_must_map_every_domain_of_the_prompts_and_no_other(two_domain_prompts, tiny_run):
    for teachers, message in (({"add": "toy"}, r"\['sub'\] have no teacher"),
                              ({"add": "toy", "sub": "toy", "mul": "toy"}, r"\['mul'\] are in no prompt"),
                              ({"add": "toy", "sub": "toy:mul"}, "toy:mul is the toy specialist of domain 'mul'")):
        with pytest.raises(ConfigError, match=message):
            models_stage.teacher_specs(ModelsConfig(teachers=teachers), two_domain_prompts)
    assert models_stage.teacher_specs(ModelsConfig(teachers={"sub": "toy:add", "add": "toy"}),
                                      two_domain_prompts) == {"add": "toy:add", "sub": "toy:add"}
    with pytest.raises(ConfigError, match="has prompts without a domain"):  # version-1 style: the unnamed domain
        models_stage.teacher_specs(ModelsConfig(teachers={"add": "toy"}), _v1_prompts(tiny_run, two_domain_prompts))


# --- prompts with domains -------------------------------------------------------------------------------


def test_two_domains_alternate_in_every_split_and_add_keeps_its_prompts(two_domain_prompts, tiny_run):
    for split in ("teacher_train", "sft", "opd", "eval"):
        rows, single = read_split(two_domain_prompts, split), read_split(tiny_run / "data/prompts", split)
        assert [r["domain"] for r in rows] == ["add", "sub"] * len(single)
        assert [r["prompt"] for r in rows[::2]] == [r["prompt"] for r in single]  # the single-domain prompts
        assert all(toy_task.domain_of(r["prompt"]) == r["domain"] for r in rows)
        assert all(r["answer"] == toy_task.solve(r["prompt"]) for r in rows)


def _v1_prompts(tiny_run, tmp_path):
    """The tiny run's prompts written as version 1 (no domain column)."""
    table, provenance = shards.read_shards(tiny_run / "data/prompts", prompts_schema)
    out = tmp_path.parent / "v1_prompts"
    if not out.exists():
        old = pa.schema([f for f in prompts_schema.schema() if f.name != "domain"],
                        metadata={**prompts_schema.schema().metadata, b"opd.schema_version": b"1"})
        mp = pytest.MonkeyPatch()
        mp.setattr(prompts_schema, "VERSION", 1)
        shards.write_shard(out, 0, table.drop_columns(["domain"]).cast(old), prompts_schema, provenance)
        mp.undo()
    return out


def test_version_1_prompts_are_read_as_one_unnamed_domain(tiny_run, tmp_path):
    out = _v1_prompts(tiny_run, tmp_path)
    assert shards.checked_schema(shards.list_shards(out)[0], prompts_schema).metadata[b"opd.schema_version"] == b"1"
    rows = read_split(out, "sft")
    assert {r["domain"] for r in rows} == {None}
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in read_split(tiny_run / "data/prompts", "sft")]


def test_a_source_names_each_prompts_domain(tmp_path):
    records = [{"question": f"{i} + {i} =", "answer": str(2 * i), "kind": "ab"[i % 2]} for i in range(20)]
    records.append({"question": "bad", "answer": "1", "kind": 3})
    source = tmp_path / "q.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = PromptsConfig(source=str(source), prompt_column="question", domain_column="kind")
    prompts.run(TaskConfig(), tmp_path / "p", cfg)
    rows = read_rows(tmp_path / "p")
    assert len(rows) == 20 and all(r["domain"] == "ab"[int(r["answer"]) // 2 % 2] for r in rows.values())
    with pytest.raises(Exception, match=r"line 21, column 'kind': expected a non-empty string \(the prompt's domain\)"):
        prompts.run(TaskConfig(), tmp_path / "p2", dataclasses.replace(cfg, strict=True))


# --- the guard, domain by domain (hand-built provenance) ------------------------------------------------


def _teacher(name):
    return {"id": name, "weights_sha256": name * 8, "tokenizer_sha256": "tok"}


def _sft(teachers):
    single = teachers.get(None)
    return {"base": {"id": "student", "tokenizer_sha256": "tok"}, "sft_data_teacher": single,
            **({} if single else {"sft_data_teachers": teachers})}


def _cache(teachers):
    return {"k": 4, "teacher": None, "domain_teachers": teachers, "domain_shards": {d: f"cache/part-{d}" for d in
                                                                                       teachers}}


def test_the_guard_checks_teacher_consistency_domain_by_domain():
    cfg = section("opd")
    a, b = _teacher("A"), _teacher("B")
    cache.check_consistency(cfg, _sft({"add": a, "sub": b}), _cache({"add": a, "sub": b}), "", None)
    cache.check_consistency(cfg, _sft({None: a}), _cache({"add": a, "sub": a}), "", None)  # SFT data of before
    with pytest.raises(ConfigError, match=r"teacher inconsistency in domain 'sub': the SFT data of models/sft was "
                                          r"written by B .* but cache/part-sub was scored by A .*models.teachers"):
        cache.check_consistency(cfg, _sft({"add": a, "sub": b}), _cache({"add": a, "sub": a}), "", "models/sft")
    with pytest.raises(ConfigError, match=r"teacher inconsistency in every domain: .* names none for it .*--prompts"):
        cache.check_consistency(cfg, _sft({"add": a, "sub": b}), _cache({None: a}), "", "models/sft")
    allowed = dataclasses.replace(cfg, allow_teacher_mismatch=True)
    cache.check_consistency(allowed, _sft({"add": a, "sub": b}), _cache({"add": a, "sub": a}), "", "models/sft")


def test_overall_metrics_are_the_domains_weighted_by_their_prompts():
    parts = {"add": {"accuracy": 1.0, "mean_response_tokens": 7.0},
             "sub": {"accuracy": 0.25, "mean_response_tokens": 4}}
    assert evaluate.weighted_mean(parts, {"add": 1, "sub": 3}) == {"accuracy": 0.4375, "mean_response_tokens": 4.75}


def test_the_study_arms_reuse_the_both_arms_specialists(tmp_path):
    """With `both`'s models stage done, an alone arm's one teacher is the directory of both's specialist (the same
    weights, not trained again); without it, the specialist is trained in the arm."""
    from bench import multi_teacher

    specialists = tmp_path / "both/seed0/models/base"
    reused = multi_teacher.arm_params({}, "sub_alone", specialists)
    assert reused["task"]["domains"] == ["add", "sub"]
    assert reused["models"]["teachers"] == {"add": str(specialists / "teacher-sub"),
                                            "sub": str(specialists / "teacher-sub")}
    assert multi_teacher.arm_params({}, "sub_alone")["models"]["teachers"] == {"add": "toy:sub", "sub": "toy:sub"}
    assert multi_teacher.arm_params({}, "both", specialists)["models"]["teachers"] == {"add": "toy", "sub": "toy"}


def test_the_study_doubles_the_steps_and_a_set_still_wins():
    from bench import multi_teacher
    from pipeline.config import Params, load_params

    study = multi_teacher.study_steps(TINY_PARAMS)
    assert study == [f"models.teacher_training.steps={2 * section('models').teacher_training.steps}",
                     f"sft.steps={2 * section('sft').steps}", f"opd.steps={2 * section('opd').steps}"]
    params = load_params(Params(TINY_PARAMS, (*study, "sft.steps=5")))
    assert params["sft"]["steps"] == 5 and params["opd"]["steps"] == 2 * section("opd").steps


# --- the tiny two-domain pipeline (bench/multi_teacher.py's `both` arm) ---------------------------------


@pytest.mark.slow  # the shared two-domain run: about two and a half minutes on 2 CPU cores, once a session
def test_each_domain_has_its_specialist_and_its_sft_data(both):
    manifest = models.read_manifest(both / "models/base")
    assert "teacher" not in manifest and set(manifest["teachers"]) == {"add", "sub"}
    add, sub = manifest["teachers"]["add"], manifest["teachers"]["sub"]
    assert (add["id"], sub["id"], add["domain"], sub["domain"]) == ("toy-teacher-add", "toy-teacher-sub", "add", "sub")
    assert add["weights_sha256"] != sub["weights_sha256"]
    table, provenance = shards.read_shards(both / "data/sft", sft_samples)
    assert "teacher" not in provenance
    assert provenance["teachers"] == {d: models.identity(t) for d, t in manifest["teachers"].items()}
    domains = {r["prompt_id"]: r["domain"] for r in read_split(both / "data/prompts", "sft")}
    written = [domains[p] for p in table["prompt_id"].to_pylist()]
    assert set(written) == {"add", "sub"}
    sft = models.read_provenance(both / "models/sft")
    assert sft["sft_data_teacher"] is None and sft["sft_data_teachers"] == provenance["teachers"]
    control = shards.read_shards(both / "data/control_sft", sft_samples)[1]  # control_data: the same teachers
    assert control["teachers"] == provenance["teachers"] and control["split"] == "opd"


@pytest.mark.slow
def test_each_cache_row_is_scored_by_its_domains_teacher(both):
    manifest = models.read_manifest(both / "models/base")
    domains = {r["prompt_id"]: r["domain"] for r in read_rows(both / "data/prompts").values()}
    checked = set()
    for path in shards.list_shards(both / "data/teacher_cache"):
        table, provenance = shards.read_shard(path, teacher_cache)
        assert teacher_cache.has_row_teacher(table) and "teacher" not in provenance
        assert provenance["domains"] == {d: t["id"] for d, t in manifest["teachers"].items()}
        assert provenance["teachers"] == {t["id"]: models.identity(t) for t in manifest["teachers"].values()}
        rollouts_table = shards.read_shard(shards.shard_path(both / "data/rollouts", int(path.stem[-5:])),
                                           teacher_cache.rollouts_schema)[0]
        for row in range(table.num_rows):
            domain = domains[table["prompt_id"][row].as_py()]
            assert table["domain"][row].as_py() == domain
            assert table["teacher"][row].as_py() == manifest["teachers"][domain]["id"]
            if domain in checked:
                continue
            # the exact values: the domain's own teacher's log-probs of the response, from its forward pass
            checked.add(domain)
            teacher = models.load_model(manifest["teachers"][domain]["path"])
            prompt, response = rollouts_table["prompt_ids"][row].as_py(), rollouts_table["response_ids"][row].as_py()
            with torch.no_grad():
                logits = teacher(torch.tensor([prompt + response])).logits[0, len(prompt) - 1:-1]
            expected = torch.log_softmax(logits.double(), -1).gather(-1, torch.tensor(response)[:, None])[:, 0]
            got = torch.tensor(table["teacher_token_logprobs"][row].as_py(), dtype=torch.float64)
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert checked == {"add", "sub"}


@pytest.mark.slow
def test_inspect_summarises_each_domains_rows_and_teacher(both):
    """`opd inspect` of the cache: each (domain, teacher)'s rows and mean sampled-token log-prob, against pyarrow."""
    table = shards.read_shards(both / "data/teacher_cache", teacher_cache)[0]
    expected = {}
    for domain in ("add", "sub"):
        rows = table.filter(pc.equal(table["domain"], domain))
        logprobs = pc.list_flatten(rows["teacher_token_logprobs"]).to_numpy().astype("float64")
        expected[f"{domain} / toy-teacher-{domain}"] = {"rows": rows.num_rows,
                                                        "mean_teacher_logprob": round(float(logprobs.mean()), 4)}
    summary = summarise(both / "data/teacher_cache")
    assert summary["by_domain"].keys() == expected.keys()
    for key, value in expected.items():
        assert summary["by_domain"][key]["rows"] == value["rows"]
        assert summary["by_domain"][key]["mean_teacher_logprob"] == pytest.approx(value["mean_teacher_logprob"],
                                                                                  abs=1e-4)
    assert summarise(both / "data/prompts")["by_domain"] == {
        domain: {"rows": len([r for r in read_rows(both / "data/prompts").values() if r["domain"] == domain])}
        for domain in ("add", "sub")}


@pytest.mark.slow
def test_evaluate_reports_each_domain_beside_the_overall_numbers(both):
    metrics = json.loads((both / "metrics/eval.json").read_text())
    counts = {d: sum(r["domain"] == d for r in read_split(both / "data/prompts", "eval")) for d in ("add", "sub")}
    for role in evaluate.ROLES:
        assert set(metrics[role]["domains"]) == {"add", "sub"}
        overall = {k: v for k, v in metrics[role].items() if k != "domains"}
        assert overall == evaluate.weighted_mean(metrics[role]["domains"], counts)
    cache_teachers = models.read_provenance(both / "models/opd")["cache_teachers"]
    assert {d: t["id"] for d, t in cache_teachers.items()} == {"add": "toy-teacher-add", "sub": "toy-teacher-sub"}


@pytest.mark.slow
def test_a_cache_scored_by_another_domains_teacher_is_refused(both, tmp_path):
    """One specialist (add's) serving both domains: trained exactly as in `both`, it scores the sub rows too, and OPD
    from the SFT student whose sub data the sub specialist wrote refuses that cache, naming the domain."""
    cfg = dataclasses.replace(section("models"), teachers={"add": "toy:add", "sub": "toy:add"}, seed=0)
    cfg.teacher_training.seed = 0
    models_stage.run(cfg, TASK, both / "data/prompts", tmp_path / "models")
    alone = models.read_manifest(tmp_path / "models")["teachers"]
    both_add = models.read_manifest(both / "models/base")["teachers"]["add"]
    assert alone["add"]["weights_sha256"] == alone["sub"]["weights_sha256"] == both_add["weights_sha256"]
    teacher_logprobs.run(section("teacher_logprobs"), section("engine"), tmp_path / "models", both / "data/rollouts",
                         tmp_path / "cache", prompts_dir=both / "data/prompts")
    table = shards.read_shards(tmp_path / "cache", teacher_cache)[0]
    assert set(table["teacher"].to_pylist()) == {"toy-teacher-add"}
    with pytest.raises(ConfigError, match=rf"teacher inconsistency in domain 'sub': .* written by toy-teacher-sub .* "
                                          rf"{tmp_path / 'cache'}/part-\d+.parquet was scored by toy-teacher-add"):
        opd.run(section("opd"), both / "models/sft", both / "data/rollouts", tmp_path / "cache", tmp_path / "opd")
    with pytest.raises(ConfigError, match="no prompts were given to read the rollouts' domains from"):
        teacher_logprobs.run(section("teacher_logprobs"), section("engine"), both / "models/base",
                             both / "data/rollouts", tmp_path / "cache2")


@pytest.mark.slow
def test_refresh_rounds_are_scored_by_each_domains_teacher(both, tmp_path):
    cfg = dataclasses.replace(section("opd"), steps=2, refresh_every=1)
    refresh = opd.Refresh(section("rollouts"), section("teacher_logprobs"), section("engine"), both / "models/base",
                          both / "data/prompts")
    opd.run(cfg, both / "models/sft", both / "data/rollouts", both / "data/teacher_cache", tmp_path / "opd",
            tmp_path / "rounds", refresh)
    table = shards.read_shards(tmp_path / "rounds" / "round-001" / "teacher_cache", teacher_cache)[0]
    pairs = set(zip(table["domain"].to_pylist(), table["teacher"].to_pylist()))
    assert pairs == {("add", "toy-teacher-add"), ("sub", "toy-teacher-sub")}


def test_a_version_2_cache_is_read_as_one_teachers(tiny_run, tmp_path, monkeypatch):
    """A cache written before the per-row teacher (v2) trains as before: every row scored by its provenance's one
    teacher, in the unnamed domain."""
    monkeypatch.setattr(teacher_cache, "VERSION", 2)
    for path in shards.list_shards(tiny_run / "data/teacher_cache"):
        table, provenance = shards.read_shard(path, teacher_cache)
        old = {k: v for k, v in provenance.items() if k not in ("teachers", "domains")}
        shards.write_shard(tmp_path / "cache", int(path.stem[-5:]), table.drop_columns(["domain", "teacher"]),
                           teacher_cache, old)
    monkeypatch.undo()
    first = shards.list_shards(tmp_path / "cache")[0]
    assert shards.checked_schema(first, teacher_cache).metadata[b"opd.schema_version"] == b"2"
    rows, _, provenance = cache.open_cache(tiny_run / "data/rollouts", tmp_path / "cache")
    assert provenance["domain_teachers"] == {None: provenance["teacher"]}
    cache.check_consistency(section("opd"), models.read_provenance(tiny_run / "models/sft"), provenance,
                            models.weights_hash(tiny_run / "models/sft"), tiny_run / "models/sft")
    assert pc.sum(pa.array([len(r["teacher_logprobs"]) for r in [rows[i] for i in range(len(rows))]])).as_py() > 0
