"""The `evidence` system's settings (evidence_docs, evidence_tokens, evidence_lookahead) on held-out *train* questions
(never dev).

The questions the shipped checkpoint's training set aside (`trainer_state.json`): the docid search runs once per
question for the widest candidate set; each setting then writes its evidence from the top `evidence_docs` of those
documents and the base LLM answers from it (`--stop-at-end`: the evidence also stops where the LLM prefers to).
Prints, per setting: accuracy, EM, F1, evidence_has_answer, mean
evidence tokens, the stop reasons and seconds a question. One process, one thread:

    OMP_NUM_THREADS=1 python -m benchmarks.evidence_settings --corpus nq --limit 20
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from statistics import mean

from benchmarks.four_bit_recovery import held_out
from unirag.data import load_corpus, load_questions, prepare_question
from unirag.eval import contains_answer, exact_match, token_f1
from unirag.paths import REPO_ROOT, default_data_dir
from unirag.settings import LIMITS, InferenceSettings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="nq", choices=("nq", "squad"))
    parser.add_argument("--limit", type=int, default=20, help="held-out train questions (the first N)")
    parser.add_argument("--docs", type=int, nargs="+", default=[1, 3], help="evidence_docs values")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 48], help="evidence_tokens values")
    parser.add_argument("--lookahead", type=int, nargs="+", default=[0], help="evidence_lookahead values")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--beam-width", type=int, help="the docid search's beam (default: the checkpoint's)")
    parser.add_argument("--self-check", type=int, help="the search's self-check N (default: the checkpoint's)")
    parser.add_argument("--stop-at-end", action="store_true",
                        help="also stop where the LLM prefers EOS or a newline (EvidenceSystem(stop_at_end=True))")
    args = parser.parse_args(argv)

    from unirag.joint import JointSystem
    from unirag.joint.evidence_system import EvidenceSystem
    from unirag.joint.passage_cache import PassageCache

    data = default_data_dir() / args.corpus
    corpus = load_corpus(data / "corpus.jsonl")
    questions = held_out(args.corpus, load_questions(data / "train.jsonl", corpus))[0][: args.limit]
    ckpt = REPO_ROOT / "checkpoints" / f"{args.corpus}-smollm2"
    joint = JointSystem.from_checkpoint(ckpt, corpus, precision=args.precision, attn_implementation="sdpa",
                                        traces=False)
    joint.passage_cache = PassageCache.find(joint.model, corpus)
    base = InferenceSettings.from_existing(ckpt, args.precision, passage_cache=joint.passage_cache is not None,
                                           beam_width=args.beam_width, self_check=args.self_check)
    system = EvidenceSystem(joint, stop_at_end=args.stop_at_end)
    widest = min(max(args.docs), LIMITS["evidence_docs"][1])
    rows: dict[tuple[int, int, int], list[dict]] = {
        (d, t, w): [] for d in args.docs for t in args.tokens for w in args.lookahead}
    reference: list[float] = []  # the joint system's base reader on the top document: the same search, read whole
    for q in questions:
        text, _ = prepare_question(q.question)
        retrieval = joint.retrieve(text, base.replace(k_docs=widest))
        whole = joint.read(text, retrieval.docs[:1], base.replace(joint_reader="base"))
        reference.append(contains_answer(whole.text, q.answers))
        for (n_docs, n_tokens, weight), out in rows.items():
            settings = base.replace(evidence_docs=n_docs, evidence_tokens=n_tokens, evidence_lookahead=weight,
                                    joint_reader="base")
            start = time.perf_counter()
            evidence = system.evidence(text, retrieval.docs[:n_docs], settings)
            context = [] if evidence is None else [system.evidence_passage(evidence, retrieval.docs)]
            answer = joint.read(text, context, settings)
            out.append({"accuracy": contains_answer(answer.text, q.answers), "em": exact_match(answer.text, q.answers),
                        "f1": token_f1(answer.text, q.answers),
                        "evidence_has_answer": contains_answer(evidence.text if evidence else "", q.answers),
                        "tokens": evidence.tokens if evidence else 0,
                        "stop": evidence.stop_reason if evidence else "none",
                        "seconds": time.perf_counter() - start})
    print(json.dumps({"corpus": args.corpus, "questions": len(questions), "precision": args.precision,
                      "self_check": base.self_check, "beam_width": base.beam_width, "stop_at_end": args.stop_at_end,
                      "joint_base_reader_top1_accuracy": round(mean(reference), 3)}))
    for (n_docs, n_tokens, weight), out in rows.items():
        summary = {key: round(mean(r[key] for r in out), 3) for key in
                   ("accuracy", "em", "f1", "evidence_has_answer", "tokens", "seconds")}
        print(json.dumps({"evidence_docs": n_docs, "evidence_tokens": n_tokens, "evidence_lookahead": weight, **summary,
                          "stops": dict(Counter(r["stop"] for r in out))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
