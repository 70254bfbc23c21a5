"""The readers' answer modes (`answer_mode` span vs free, and a prompt-only instruction baseline) with the gold
passage in hand, on held-out *train* questions (never dev): retrieval plays no part, so this measures the reader.

For each mode, on the first N questions the shipped checkpoint's training held out (`trainer_state.json`): EM,
F1, contains-gold accuracy, answer words, how many answers end mid-word, and seconds a question. One process, one
thread:

    OMP_NUM_THREADS=1 python -m benchmarks.answer_modes --corpus nq --limit 50 --precision 4bit
"""

from __future__ import annotations

import argparse
import json
import time
from statistics import mean, median

from benchmarks.four_bit_recovery import held_out
from unirag.data import Passage, load_corpus, load_questions
from unirag.eval import contains_answer, exact_match, token_f1
from unirag.paths import default_data_dir
from unirag.settings import InferenceSettings

# A prompt-only baseline for the free reader: the question rewritten as an instruction (no training).
INSTRUCTION = "Answer with a few words copied from the passage. {question}"


def ends_mid_word(answer: str, text: str) -> bool:
    """True when the answer occurs in the text only as part of a longer word (it was cut inside one)."""
    answer = answer.strip()
    if not answer or answer not in text:
        return False
    start = 0
    while (at := text.find(answer, start)) >= 0:
        end = at + len(answer)
        if end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum()):
            return False
        start = at + 1
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", default="nq", choices=("nq", "squad"))
    parser.add_argument("--limit", type=int, default=50, help="held-out train questions (the first N)")
    parser.add_argument("--precision", default="4bit")
    parser.add_argument("--modes", nargs="+", default=["free", "span", "instruction"],
                        choices=("free", "span", "instruction", "instruction-span"))
    parser.add_argument("--max-new-tokens", type=int, default=InferenceSettings().max_new_tokens)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)

    from unirag.backbones import load_llm
    from unirag.rag import Reader

    data = default_data_dir() / args.corpus
    corpus = load_corpus(data / "corpus.jsonl")
    questions = held_out(args.corpus, load_questions(data / "train.jsonl", corpus))[0][: args.limit]
    model, tokenizer = load_llm(None, precision=args.precision, attn_implementation="sdpa")
    reader = Reader(model, tokenizer)
    report = {"corpus": args.corpus, "split": "held-out train", "questions": len(questions),
              "precision": args.precision, "max_new_tokens": args.max_new_tokens, "modes": {}}
    for mode in args.modes:
        answer_mode = "span" if mode.endswith("span") else "free"
        rows = []
        for start in range(0, len(questions), args.batch_size):
            batch = questions[start : start + args.batch_size]
            texts = [INSTRUCTION.format(question=q.question) if mode.startswith("instruction") else q.question
                     for q in batch]
            passages: list[list[Passage]] = [[corpus[q.doc_id]] for q in batch]
            began = time.perf_counter()
            outs = reader.read_many(texts, passages, args.max_new_tokens, answer_mode=answer_mode)
            seconds = (time.perf_counter() - began) / len(batch)
            for q, out, ps in zip(batch, outs, passages, strict=True):
                rows.append({"em": exact_match(out.text, q.answers), "f1": token_f1(out.text, q.answers),
                             "accuracy": contains_answer(out.text, q.answers), "words": len(out.text.split()),
                             "mid_word": ends_mid_word(out.text, ps[0].as_context()), "seconds": seconds})
        report["modes"][mode] = {
            "em": round(mean(r["em"] for r in rows), 4), "f1": round(mean(r["f1"] for r in rows), 4),
            "accuracy": round(mean(r["accuracy"] for r in rows), 4),
            "words_median": median(r["words"] for r in rows),
            "ends_mid_word": sum(r["mid_word"] for r in rows),
            "seconds_per_question": round(mean(r["seconds"] for r in rows), 3)}
        print(json.dumps({"mode": mode, **report["modes"][mode]}), flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
