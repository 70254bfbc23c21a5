"""benchmarks.gr_vs_dr: nested corpus subsets, the union, the GR-vs-DR table, and the measurement end to end on a
tiny random joint model (offline, seconds)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from benchmarks import gr_vs_dr
from benchmarks.report import update_report
from unirag import results, studies
from unirag.data import Corpus, Passage, Question
from unirag.errors import UniragError


def _dataset(prefix: str, n: int, per_doc: int = 1) -> gr_vs_dr.Dataset:
    corpus = Corpus([Passage(f"{prefix}{i:03d}", f"T{i}", f"passage {i} about topic {i}.") for i in range(n)],
                    source=prefix)
    questions = [Question(f"{prefix}-q{i}-{j}", f"question {j} on {i}?", ("a",), f"{prefix}{i:03d}")
                 for i in range(n) for j in range(per_doc)]
    return gr_vs_dr.Dataset(corpus, questions[::2], questions[1::2])


def test_subsets_are_seeded_nested_and_hold_their_questions_golds():
    data = _dataset("nq", 60, per_doc=2)
    small, large = gr_vs_dr.subset(data, 10), gr_vs_dr.subset(data, 30)
    assert len(small.corpus) == 10 and len(large.corpus) == 30
    assert set(small.corpus.ids) < set(large.corpus.ids)  # nested
    for part in (small, large):
        for q in [*part.train, *part.dev]:
            assert q.doc_id in part.corpus
        # every question of the source whose gold is inside is kept, in order
        assert part.train == [q for q in data.train if q.doc_id in part.corpus]
        assert part.dev == [q for q in data.dev if q.doc_id in part.corpus]
    assert gr_vs_dr.subset(data, 10).corpus.ids == small.corpus.ids  # seeded
    assert gr_vs_dr.subset(data, 10, seed=1).corpus.ids != small.corpus.ids
    assert small.corpus.ids == sorted(small.corpus.ids)  # corpus order kept
    with pytest.raises(UniragError):
        gr_vs_dr.subset(data, 61)


def test_union_keeps_distinct_ids_and_prefixes_colliding_ones():
    nq, squad = _dataset("nq", 5), _dataset("sq", 4)
    pooled = gr_vs_dr.union({"nq": nq, "squad": squad})
    assert len(pooled.corpus) == 9 and pooled.corpus.ids[:5] == nq.corpus.ids
    assert len(pooled.train) == len(nq.train) + len(squad.train)
    clash = gr_vs_dr.union({"nq": nq, "squad": _dataset("nq", 4)})
    ids = clash.corpus.ids
    assert len(set(ids)) == len(ids) == 9 and ids[0] == "nq/nq000" and ids[-1] == "squad/nq003"
    questions = [*clash.train, *clash.dev]
    assert len({q.id for q in questions}) == len(questions)
    assert all(q.doc_id in clash.corpus and q.doc_id.split("/")[0] == q.id.split("/")[0] for q in questions)


def test_match_density_samples_questions_per_passage_like_the_reference():
    nq, squad = _dataset("nq", 20), _dataset("sq", 10, per_doc=4)  # 10 train questions on 20 passages; 20 on 10
    matched = gr_vs_dr.match_density(squad, nq)
    assert matched.corpus is squad.corpus
    assert len(matched.train) == 5 and len(matched.dev) == 5  # nq's 0.5 a passage, on 10 passages
    assert {q.id for q in matched.train} <= {q.id for q in squad.train}
    assert matched.train == gr_vs_dr.match_density(squad, nq).train  # seeded
    assert matched.train != gr_vs_dr.match_density(squad, nq, seed=1).train
    assert gr_vs_dr.match_density(nq, squad).train == nq.train  # never more questions than there are


def test_build_writes_loadable_folders(tmp_path):
    data = tmp_path / "data"
    for name, prefix, n in (("nq", "nq", 40), ("squad", "sq", 12)):
        gr_vs_dr.write_dataset(_dataset(prefix, n, per_doc=2), data / name, {})
    built = gr_vs_dr.build_sizes(["10", "all", "union"], data, tmp_path / "out")
    for size, passages in (("10", 10), ("all", 40), ("union", 52)):
        back = gr_vs_dr.load_dataset(tmp_path / "out" / size)  # validates golds against the corpus
        assert len(back.corpus) == passages and back.corpus.ids == built[size].corpus.ids
        assert len(back.train) == len(built[size].train) and back.dev == built[size].dev
        manifest = json.loads((tmp_path / "out" / size / "manifest.json").read_text())
        assert manifest["store_corpus"] == gr_vs_dr.store_corpus_name(size) and manifest["passages"] == passages
    manifest = json.loads((tmp_path / "out" / "union" / "manifest.json").read_text())
    splits = gr_vs_dr.question_splits(built["union"], manifest, held=[])
    assert [q.id for q in splits["dev"]] == [q.id for q in built["all"].dev]  # nq's dev questions, as at `all`
    assert splits["dev-squad"] and all(q.doc_id.startswith("sq") for q in splits["dev-squad"])
    assert len(splits["dev"]) + len(splits["dev-squad"]) == len(built["union"].dev)
    assert list(gr_vs_dr.question_splits(built["all"], {}, held=[])) == ["dev", "train-held-out"]
    with pytest.raises(UniragError):
        gr_vs_dr.check_size("half")


def _row(size: int, role: str, split: str, r1: float, r3: float, precision: str = "fp32") -> dict:
    metrics = {k: None for k in results.METRIC_KEYS}
    metrics.update({"recall@1": r1, "recall@3": r3})
    return {"run": f"gr-vs-dr: {role}, {size} passages", "system": "rag" if role == "dense" else "joint",
            "corpus": f"nq-{size}", "split": split, "precision": "fp32" if role == "dense" else precision, "n": 7,
            "settings": {"gr_vs_dr": role, "passages": size}, "metrics": metrics, "command": "test",
            "date": "2026-12-01", "machine": results.MACHINE, "source": "python -m benchmarks.gr_vs_dr"}


def test_render_gr_vs_dr_table_and_points():
    rows = [_row(1000, "search", "dev", 0.5, 0.6), _row(1000, "self-check", "dev", 0.55, 0.7),
            _row(1000, "dense", "dev", 0.6, 0.8), _row(300, "search", "dev", 0.7, 0.8),
            _row(300, "dense", "dev", 0.75, 0.9), _row(300, "self-check", "dev", 0.8, 0.85),
            _row(300, "search", "train-held-out", 0.4, 0.5), _row(300, "search", "dev", 0.1, 0.2, "4bit"),
            {**_row(300, "dense", "dev", 0.0, 0.0), "run": "RAG top-1", "corpus": "nq"}]  # not a gr-vs-dr row
    lines = studies.render_gr_vs_dr(rows).splitlines()
    assert lines[0].startswith("| corpus (passages) | split | precision |") and len(lines) == 2 + 4
    assert lines[2] == "| nq-300 (300) | dev | fp32 | 7 | 0.700 / 0.800 | 0.800 / 0.850 | 0.750 / 0.900 | +0.050 |"
    assert lines[3] == "| nq-1000 (1,000) | dev | fp32 | 7 | 0.500 / 0.600 | 0.550 / 0.700 | 0.600 / 0.800 | -0.050 |"
    assert lines[4].startswith("| nq-300 (300) | dev | 4bit | 7 | 0.100 / 0.200 | – | 0.750 / 0.900 | – |")
    assert lines[5].startswith("| nq-300 (300) | train-held-out | fp32 | 7 | 0.400 / 0.500 | – | – | – |")
    assert studies.gr_vs_dr_points(rows, "dense", "dev", "recall@1") == [(300, 0.75), (1000, 0.6)]
    assert studies.gr_vs_dr_points(rows, "search", "dev", "recall@3", "4bit") == [(300, 0.2)]
    text = "x\n<!-- results:gr-vs-dr -->\nstale\n<!-- /results -->\ny"
    table = "\n".join(lines)
    assert update_report(text, rows) == f"x\n<!-- results:gr-vs-dr -->\n{table}\n<!-- /results -->\ny"


def test_plot_writes_a_png(tmp_path):
    rows = [_row(300, "search", "dev", 0.7, 0.8), _row(1000, "search", "dev", 0.5, 0.6),
            _row(300, "dense", "dev", 0.75, 0.9)]
    path = gr_vs_dr.plot(rows, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_measure_end_to_end_on_a_tiny_joint_model(tiny_llm_dirs, tmp_path, monkeypatch):
    from conftest import BagOfWordsEncoder

    from unirag.backbones import load_llm
    from unirag.docids import DocidTree, TreeConfig
    from unirag.joint.config import JointConfig
    from unirag.joint.modeling import JointModel
    from unirag.joint.training import STATE_FILE, TrainConfig

    monkeypatch.setattr(gr_vs_dr, "SELF_CHECK_N", 3)  # 7 documents: re-rank the top 3
    words = ["apple", "river", "mountain", "violin", "rocket", "garden", "winter"]
    corpus = Corpus([Passage(f"d{i}", w.title(), f"the {w} is here.") for i, w in enumerate(words)], source="tiny")
    # Questions are passage texts: the bag-of-words dense side must find each gold first (R@1 = 1).
    questions = [Question(f"q{i}", corpus[f"d{i % 7}"].text, ("a",), f"d{i % 7}") for i in range(12)]
    folder = tmp_path / "7"
    gr_vs_dr.write_dataset(gr_vs_dr.Dataset(corpus, questions[:9], questions[9:]), folder,
                           {"size": "7", "seed": 0, "store_corpus": "nq-7"})
    docids = [(0, 0, 0), (0, 0, 1), (0, 1), (1, 0, 0), (1, 2, 3), (2, 3), (3, 1, 2)]
    tree = DocidTree(corpus.ids, docids, TreeConfig(), corpus.fingerprint)
    base, tokenizer = load_llm(str(tiny_llm_dirs["llama"]))
    model = JointModel(base, JointConfig(base_model=str(tiny_llm_dirs["llama"]), docid_levels=3, docid_branching=4,
                                         pathway_layers=2, retrieval_heads=2, retrieval_mlp_dim=32), tokenizer)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random retrieval weights; the bridge stays at its identity init, as stage 1 leaves it
        for name, p in model.joint_named_parameters():
            if not name.startswith("bridge."):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    ckpt = model.save_pretrained(folder / "ckpt", tree=tree)
    config = asdict(TrainConfig(corpus="c", questions="q", out="o", validation_questions=4, stage1_epochs=1))
    (ckpt / STATE_FILE).write_text(json.dumps({"stage": 1, "epoch": 1, "step": 0, "config": config}))

    result = gr_vs_dr.measure(folder, "fp32", progress=False, command="python -m benchmarks.gr_vs_dr measure",
                              encoder=BagOfWordsEncoder())
    assert json.loads((folder / "measure_fp32.json").read_text())["splits"].keys() == {"dev", "train-held-out"}
    dev, held = result["splits"]["dev"], result["splits"]["train-held-out"]
    assert [r["id"] for r in dev["records"]] == ["q9", "q10", "q11"] and len(held["records"]) == 4
    for block in (dev, held):
        for record in block["records"]:
            assert len(record["search"]) == len(set(record["search"])) == 7  # beam 10 over 7 documents: all
            assert len(record["self-check"]) == 3 and set(record["self-check"]) == set(record["search"][:3])
            assert record["self-check_candidates"] == record["search"][:3]
        s = block["summaries"]
        assert s["dense"]["recall@1"] == 1.0 and s["search"]["recall@k"] == 1.0 and s["search"]["k"] == 10
        assert s["self-check"]["candidate_recall@1"] == s["search"]["recall@1"]
        assert s["self-check"]["recall@3"] == s["self-check"]["candidate_recall@n"] == s["search"]["recall@3"]
        assert s["search"]["recall@1"] == gr_vs_dr.recall(block["records"], "search", 1)

    rows = gr_vs_dr.rows_of(result, result["command"])
    assert len(rows) == 6 and all(results.validate_row(r) for r in rows)
    assert {(r["system"], r["precision"], r["corpus"]) for r in rows} == {("joint", "fp32", "nq-7"),
                                                                          ("rag", "fp32", "nq-7")}
    store = tmp_path / "store"
    gr_vs_dr.record(result, result["command"], store)
    gr_vs_dr.record(result, result["command"], store)  # re-recording replaces the rows
    stored = results.load_store(store)
    assert len(stored) == 6 and stored[0]["settings"]["training"]["stage1_epochs"] == 1
    assert studies.render_gr_vs_dr(stored).count("| nq-7 (7) |") == 2  # dev and held-out
    # One split at a time: a later run adds its split to the saved measurement and keeps the others.
    again = gr_vs_dr.measure(folder, "fp32", progress=False, command="held again", encoder=BagOfWordsEncoder(),
                             splits=["train-held-out"])
    assert again["splits"]["dev"] == {**dev, "command": dev["command"]} and again["splits"]["train-held-out"][
        "command"] == "held again"
    assert {r["command"] for r in gr_vs_dr.rows_of(again, "")} == {"python -m benchmarks.gr_vs_dr measure",
                                                                   "held again"}
    with pytest.raises(UniragError):
        gr_vs_dr.measure(folder, "fp32", progress=False, encoder=BagOfWordsEncoder(), splits=["dev-squad"])


def test_train_runs_the_project_cli_with_the_same_flags_at_every_size(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(gr_vs_dr.subprocess, "call", lambda command, **kw: calls.append(command) or 0)
    assert gr_vs_dr.main(["train", "--size", "300", "--out", str(tmp_path)]) == 2  # not built yet: an error
    gr_vs_dr.write_dataset(_dataset("nq", 3), tmp_path / "300", {})
    assert gr_vs_dr.main(["train", "--size", "300", "--out", str(tmp_path), "--", "--seed", "1"]) == 0
    (command,) = calls
    assert command[1:4] == ["-m", "unirag", "train"] and command[-1] == "--resume"
    assert command[command.index("--questions") + 1].endswith("300/train.jsonl")
    flags = " ".join(command)
    assert " ".join(gr_vs_dr.TRAIN_FLAGS) + " --seed 1" in flags and "--stage2-steps 0" in flags
    assert json.loads((tmp_path / "300" / "train_runs.jsonl").read_text())["exit"] == 0


def test_gr_vs_dr_trend_fits_log_size_and_needs_three_sizes():
    assert studies.gr_vs_dr_trend([(1000, 0.5), (10_000, 0.4)]) is None  # two points always fit a line
    slope, at_100k = studies.gr_vs_dr_trend([(1000, 0.5), (10_000, 0.4), (100_000, 0.3)])
    assert slope == pytest.approx(-0.1) and at_100k == pytest.approx(0.3)
    assert studies.gr_vs_dr_trend([(1000, 0.5), (10_000, 0.8), (100, 0.2)])[1] == 1.0  # clipped
    rows = [_row(n, role, "dev", r1, 0.9) for n, r1 in ((300, 0.1), (1000, 0.6), (2600, 0.5), (4667, 0.4))
            for role in ("search", "dense")]
    rows += [_row(n, "dense", "dev-common", 0.9, 0.95) for n in (1000, 2600, 4667)]
    lines = studies.render_gr_vs_dr_trend(rows).splitlines()
    assert lines[2].startswith("| dev | docid search alone (beam 10) | 1,000, 2,600, 4,667 | -0.")  # 300 left out
    assert lines[3] == "| dev | docid search + self-check | – | – (fewer than 3 sizes) | – |"
    assert lines[5] == "| dev-common | dense MiniLM | 1,000, 2,600, 4,667 | +0.000 | 0.900 |" and len(lines) == 6


def test_common_questions_restrict_every_size_to_the_questions_all_measured():
    def result(size: str, ids: list[str]) -> dict:
        records = [{"id": i, "gold": "d1", "search": ["d1" if i == "q1" else "d2"], "search_s": 0.1} for i in ids]
        return {"manifest": {"size": size}, "splits": {"dev": {"summaries": {"search": {}}, "records": records}}}

    small, large = gr_vs_dr.on_common_questions([result("1000", ["q1", "q2"]), result("all", ["q1", "q2", "q3"])])
    assert list(large["splits"]) == [gr_vs_dr.COMMON_SPLIT] and large["manifest"]["size"] == "all"
    summary = large["splits"][gr_vs_dr.COMMON_SPLIT]["summaries"]["search"]
    assert summary["n"] == 2 and summary["recall@1"] == 0.5 and summary["common_to_sizes"] == ["1000", "all"]
    assert small["splits"][gr_vs_dr.COMMON_SPLIT]["records"] == result("1000", ["q1", "q2"])["splits"]["dev"][
        "records"]
