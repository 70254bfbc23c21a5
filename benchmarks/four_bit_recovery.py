"""The 4-bit recovery levers, measured against the fp32 base on held-out *train* questions (never dev).

Each lever is a way to load the base LLM in 8 or 4 bits. For every lever, on the checkpoints' held-out train
questions of nq and squad (the questions training set aside, `trainer_state.json`), with the gold passage:
- `kl_to_fp32`: mean KL(fp32 || lever) of the next-token distributions over the fp32 model's own answer tokens,
  teacher-forced (how far the lever's reader is from the fp32 reader, with little noise);
- accuracy / EM / F1 of its greedy answer (the `gold` system's prompt and reader) and `agreement_with_fp32`;
- `memory_mb` (the model's parameters and buffers) and seconds a question.

    python -m benchmarks.four_bit_recovery measure --lever fp32      # first: the reference answers
    python -m benchmarks.four_bit_recovery measure --lever nf4 --record
    python -m benchmarks.four_bit_recovery distill                  # trains the nf4-distilled adapter
    python -m benchmarks.four_bit_recovery record nf4 hqq-g32        # the rows of levers measured without --record

Levers that need choices (the modules nf4-skip-sensitive keeps in fp32, the distilled adapter) make them on the
*train* questions that are not held out, so the held-out ones stay clean. Run one process at a time per core:
`OMP_NUM_THREADS=1`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from unirag.data import Passage, Question, load_corpus, load_questions
from unirag.paths import REPO_ROOT, default_data_dir, write_json_atomic

OUT = REPO_ROOT / "runs" / "four_bit_recovery"
CORPORA = ("nq", "squad")
LORA_R = 16  # all seven projections of all 30 layers: 4.9M parameters, 9.8 MB in float16 (budget 10 MB)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH = 8
MAX_DISTILL_TOKENS = 384  # the prompt's end and the answer: what the reader's next tokens depend on most
SKIP_SHARE = 0.10  # nf4-skip-sensitive keeps this share of the linear weights (the most sensitive) in fp32

LEVERS = {
    "fp32": "float32 (the reference)",
    "nf4": "bitsandbytes NF4, fp32 compute, no double quantisation (the project's 4-bit before recovery)",
    "nf4-double-quant": "NF4 with double quantisation of the block scales",
    "fp4": "bitsandbytes FP4 instead of NF4",
    "nf4-bf16-compute": "NF4 with bfloat16 compute",
    "nf4-skip-sensitive": f"NF4, the {SKIP_SHARE:.0%} of linear weights with the largest output error kept in fp32",
    "int8": "bitsandbytes LLM.int8 (8-bit, for reference)",
    "nf4-loftq": f"NF4 + a rank-{LORA_R} LoRA initialised by LoftQ (peft replace_lora_weights_loftq)",
    "nf4-distilled": f"NF4 + a rank-{LORA_R} LoRA distilled from the fp32 base (KL) on train reading prompts",
    "hqq-g64": "HQQ 4-bit, groups of 64 (does the group size matter?)",
    "hqq-g32": "HQQ 4-bit, groups of 32 = the GGUF Q4_1 block (the recovered 4-bit; HQQ's own forward, as on a GPU)",
    "hqq-g32-cpu-int4": "hqq-g32 in PyTorch's int4 CPU kernel, bfloat16 activations (the recovered 4-bit on a CPU)",
}
PRECISION_OF = {"fp32": "fp32", "int8": "8bit", "hqq-g32": "4bit", "hqq-g64": "4bit", "hqq-g32-cpu-int4": "4bit"}
# the rest: "nf4"


def _data(corpus_name: str):
    data = default_data_dir()
    corpus = load_corpus(data / corpus_name / "corpus.jsonl")
    return corpus, load_questions(data / corpus_name / "train.jsonl", corpus)


def held_out(corpus_name: str, questions: list[Question]) -> tuple[list[Question], list[Question]]:
    """(held-out, the rest) exactly as the shipped checkpoint's training split them."""
    from unirag.joint.training import held_out_split

    state = json.loads((REPO_ROOT / "checkpoints" / f"{corpus_name}-smollm2" / "trainer_state.json").read_text())
    return held_out_split(questions, state["config"]["seed"], state["config"]["validation_questions"])


def load_plain(dtype=torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from unirag.backbones import resolve_llm_path

    path = resolve_llm_path(None)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def sensitive_modules(tokenizer, prompts: list[str], share: float = SKIP_SHARE) -> list[str]:
    """Linear layers ranked by the relative output error NF4 rounding gives them on real reading prompts
    (bitsandbytes' own quantize/dequantize), the worst kept until `share` of the weights is reached."""
    import bitsandbytes.functional as bnbf

    model, _ = load_plain()
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: inputs.setdefault(name, []).append(
        args[0].reshape(-1, args[0].shape[-1])))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("model.layers")]
    with torch.no_grad():
        for prompt in prompts:
            model(**tokenizer(prompt, return_tensors="pt", add_special_tokens=False))
    for hook in hooks:
        hook.remove()
    errors = []
    for name, module in model.named_modules():
        if name not in inputs:
            continue
        x, weight = torch.cat(inputs[name]), module.weight.data
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", blocksize=64)
        rounded = bnbf.dequantize_4bit(packed, state)
        errors.append((float((x @ (weight - rounded).T).norm() / (x @ weight.T).norm()), name, weight.numel()))
    errors.sort(reverse=True)
    total, kept, chosen = sum(e[2] for e in errors), 0, []
    for _, name, size in errors:
        if kept + size > share * total:
            break
        chosen.append(name)
        kept += size
    return chosen


def load_lever(lever: str, train_prompts: list[str]):
    """(model, tokenizer, notes) for a lever."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from unirag.backbones import resolve_llm_path
    from unirag.quantization import pack_for_cpu, quantize_hqq

    notes: dict = {}
    if lever == "fp32":
        model, tokenizer = load_plain()
        return model, tokenizer, notes
    if lever.startswith("hqq"):  # hqq-g32, or hqq-g32-cpu-int4: the same layers in PyTorch's int4 CPU kernel
        model, tokenizer = load_plain()
        model = quantize_hqq(model, group_size=int(lever.split("-g")[1].split("-")[0]))
        return (pack_for_cpu(model) if lever.endswith("-cpu-int4") else model), tokenizer, notes
    _, tokenizer = load_plain()
    bnb = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
    if lever == "int8":
        bnb = {"load_in_8bit": True}
    elif lever == "nf4-double-quant":
        bnb["bnb_4bit_use_double_quant"] = True
    elif lever == "fp4":
        bnb["bnb_4bit_quant_type"] = "fp4"
    elif lever == "nf4-bf16-compute":
        bnb["bnb_4bit_compute_dtype"] = torch.bfloat16
    elif lever == "nf4-skip-sensitive":
        skip = sensitive_modules(tokenizer, train_prompts[:16])
        bnb["llm_int8_skip_modules"] = ["lm_head", *skip]
        notes["kept_in_fp32"] = skip
    path = resolve_llm_path(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=BitsAndBytesConfig(**bnb)).eval()
    if lever in ("nf4-loftq", "nf4-distilled"):
        from peft import LoraConfig, PeftModel, get_peft_model

        if lever == "nf4-loftq":
            model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_R, target_modules=LORA_TARGETS))
            loftq_on_cpu(model, Path(path) / "model.safetensors")
            notes["loftq"] = ("one LoftQ step (peft's own low-rank decomposition of fp32 - NF4), done on the CPU: "
                              "peft's replace_lora_weights_loftq moves the weights to CUDA")
        else:
            adapter = OUT / "distilled-adapter"
            if not (adapter / "adapter_config.json").is_file():
                sys.exit(f"{adapter} is missing: run `python -m benchmarks.four_bit_recovery distill` first.")
            model = PeftModel.from_pretrained(model, str(adapter))
            notes["adapter"] = json.loads((adapter / "training.json").read_text())
        model.eval()
    return model, tokenizer, notes


@torch.no_grad()
def loftq_on_cpu(model, safetensors_path: Path) -> None:
    """peft's `replace_lora_weights_loftq` (one LoftQ step), but on the CPU: its helper hard-codes a CUDA device.
    Each LoRA pair becomes the rank-r decomposition of (fp32 weight - its NF4 rounding), with peft's own
    `_low_rank_decomposition`, so that NF4 + adapter is the best rank-r approximation of the fp32 weight."""
    import bitsandbytes.functional as bnbf
    from peft.utils.loftq_utils import _low_rank_decomposition
    from safetensors import safe_open

    with safe_open(str(safetensors_path), framework="pt") as weights:
        for name, module in model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            key = name.split("base_model.model.", 1)[-1] + ".weight"
            base = module.base_layer.weight
            residual = weights.get_tensor(key).float() - bnbf.dequantize_4bit(base.data, base.quant_state)
            parts = _low_rank_decomposition(residual, reduced_rank=module.r["default"])
            scaling = module.scaling["default"]
            module.lora_A["default"].weight.copy_(parts["R"])
            module.lora_B["default"].weight.copy_(parts["L"] / scaling)


def gold_prompt(tokenizer, question: Question, corpus) -> str:
    from unirag.rag import build_prompt, format_context

    return build_prompt(tokenizer, question.question, format_context([corpus[question.doc_id]]))


def footprint_mb(model) -> float:
    """Bytes of every tensor the model holds, each counted once (tied or shared storage too)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():  # HQQ keeps its scales and zero points in a dict, outside parameters/buffers
        if type(module).__name__ == "HQQLinear":
            tensors += [module.W_q] + [v for v in module.meta.values() if torch.is_tensor(v)]
    unique = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return round(sum(unique.values()) / 2**20, 1)


def _mean(records: list[dict], key: str, digits: int = 4) -> float:
    values = [r[key] for r in records if key in r]
    return round(sum(values) / max(1, len(values)), digits)


@torch.no_grad()
def answer_logprobs(model, tokenizer, prompt: str, answer_ids: list[int]) -> torch.Tensor:
    """Log-probabilities of the next token at each answer position (teacher-forced), [len(answer), vocab]."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: ids.shape[1] - 1].float()
    return logits.log_softmax(-1)


def measure(args) -> None:
    from unirag.eval import contains_answer, exact_match, token_f1
    from unirag.rag import GoldPassageSystem, Reader

    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    out_path = OUT / f"{args.lever}.json"
    if out_path.exists() and not args.overwrite:
        sys.exit(f"{out_path} exists; pass --overwrite to measure again.")
    reference = None
    if args.lever != "fp32":
        if not (OUT / "fp32.json").is_file():
            sys.exit("Measure the reference first: --lever fp32.")
        reference = json.loads((OUT / "fp32.json").read_text())
        fp32_model, _ = load_plain()
    corpora = {name: _data(name) for name in CORPORA}
    started = time.perf_counter()
    _, tokenizer = load_plain()
    train_prompts = []  # nf4-skip-sensitive chooses its modules on train prompts that are not held out
    for name, (corpus, questions) in corpora.items():
        rest = [q for q in held_out(name, questions)[1] if q.doc_id]
        train_prompts += [gold_prompt(tokenizer, q, corpus) for q in random.Random(1).sample(rest, 8)]
    model, tokenizer, notes = load_lever(args.lever, train_prompts)
    load_s = time.perf_counter() - started
    reader = Reader(model, tokenizer)
    result = {"lever": args.lever, "description": LEVERS[args.lever], "notes": notes, "load_s": round(load_s, 1),
              "memory_mb": footprint_mb(model), "corpora": {}}
    for name, (corpus, questions) in corpora.items():
        valid = held_out(name, questions)[0][: args.n]
        system = GoldPassageSystem(reader, corpus)
        records, seconds = [], 0.0
        # Greedy answers for the first `generate` questions (all of them for the fp32 reference), in batches of 8
        # as `eval` reads them; the KL for every question (one teacher-forced pass each, no generation).
        generate = len(valid) if reference is None else min(args.generate, len(valid))
        for start in range(0, len(valid), BATCH):
            chunk = valid[start: start + BATCH]
            answers = [None] * len(chunk)
            if start < generate:
                t0 = time.perf_counter()
                answers = system.answer_many([q.question for q in chunk], [q.doc_id for q in chunk])
                seconds += time.perf_counter() - t0
            for i, (question, answer) in enumerate(zip(chunk, answers, strict=True), start):
                record = {"id": question.id}
                if answer is not None:
                    record.update(answer=answer.text, accuracy=contains_answer(answer.text, question.answers),
                                  em=exact_match(answer.text, question.answers),
                                  f1=token_f1(answer.text, question.answers))
                if reference is not None:
                    ref = reference["corpora"][name]["records"][i]
                    assert ref["id"] == question.id
                    prompt = gold_prompt(tokenizer, question, corpus)
                    if ref["answer_ids"]:
                        p = answer_logprobs(fp32_model, tokenizer, prompt, ref["answer_ids"])
                        q = answer_logprobs(model, tokenizer, prompt, ref["answer_ids"])
                        record["kl"] = float((p.exp() * (p - q)).sum(-1).mean())
                    if answer is not None:
                        record["agrees"] = float(answer.text == ref["answer"])
                else:
                    record["answer_ids"] = tokenizer(answer.text, add_special_tokens=False)["input_ids"]
                records.append(record)
            print(f"[{args.lever}] {name} {len(records)}/{len(valid)}", file=sys.stderr, flush=True)
        result["corpora"][name] = {
            "n": len(records), "n_generated": sum("answer" in r for r in records),
            **{key: _mean(records, key) for key in ("accuracy", "em", "f1")},
            "kl_to_fp32": _mean(records, "kl", digits=7) if reference else 0.0,
            "agreement_with_fp32": _mean(records, "agrees") if reference else 1.0,
            "seconds_per_question": round(seconds / max(1, sum("answer" in r for r in records)), 3),
            "records": records}
        print(json.dumps({name: {k: v for k, v in result["corpora"][name].items() if k != "records"}}), flush=True)
    write_json_atomic(out_path, result)
    if args.record:
        record_rows(result, " ".join(["python -m benchmarks.four_bit_recovery", *sys.argv[1:]]))


def record_rows(result: dict, command: str) -> None:
    from unirag.results import append_run, row_from_summary

    lever = result["lever"]
    reference = json.loads((OUT / "fp32.json").read_text())["corpora"]
    for name, figures in result["corpora"].items():
        # fp32's accuracy on the questions this lever answered: the like-for-like comparison.
        answered = {r["id"] for r in figures["records"] if "answer" in r}
        same = [r["accuracy"] for r in reference[name]["records"] if r["id"] in answered]
        summary = {"n": figures["n"], "accuracy": figures["accuracy"], "em": figures["em"], "f1": figures["f1"],
                   "recall@1": 1.0, "recall@3": None, "recall@k": 1.0, "k": 1, "context_tokens_mean": None,
                   "latency_ms_median": None, "wall_time_s": None, "kl_to_fp32": figures["kl_to_fp32"],
                   "agreement_with_fp32": figures["agreement_with_fp32"], "memory_mb": result["memory_mb"],
                   "seconds_per_question": figures["seconds_per_question"], "n_generated": figures["n_generated"],
                   "fp32_accuracy_same_questions": round(sum(same) / max(1, len(same)), 4)}
        row = row_from_summary(
            summary, run=f"4-bit recovery lever: {lever}", system="gold", corpus=name, split="train-held-out",
            precision=PRECISION_OF.get(lever, "nf4"),
            settings={"lever": lever, "description": result["description"], **result["notes"],
                      "questions": "the checkpoint's held-out train questions (trainer_state.json)",
                      "max_new_tokens": 32},
            command=command)
        extra = ("kl_to_fp32", "agreement_with_fp32", "memory_mb", "seconds_per_question", "n_generated",
                 "fp32_accuracy_same_questions")
        row["metrics"].update({key: summary[key] for key in extra})
        row["labels"] = {k: v for k, v in row.get("labels", {}).items() if k not in extra}
        row["source"] = "python -m benchmarks.four_bit_recovery"
        append_run(row, replace=True)


def distill(args) -> None:
    """Train the nf4-distilled adapter: LoRA on the NF4 base matching the fp32 base's next-token distributions
    (KL) on reading prompts built from the non-held-out train questions (question + 1-5 passages, the gold one
    among them, then the fp32 model's own greedy answer): the base's behaviour, not the gold answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from unirag.backbones import resolve_llm_path
    from unirag.quantization import bitsandbytes_config
    from unirag.rag import Reader, build_prompt, format_context

    set_seed(0)
    teacher, tokenizer = load_plain()
    reader = Reader(teacher, tokenizer)
    student = AutoModelForCausalLM.from_pretrained(resolve_llm_path(None), dtype=torch.float32,
                                                   quantization_config=bitsandbytes_config())
    student = get_peft_model(student, LoraConfig(r=LORA_R, lora_alpha=LORA_R, lora_dropout=0.0,
                                                 target_modules=LORA_TARGETS))
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(0)
    examples = []
    for name in CORPORA:
        corpus, questions = _data(name)
        rest = held_out(name, questions)[1]
        examples += [(q, corpus) for q in rest if q.doc_id]
    rng.shuffle(examples)
    losses = []
    for step in range(args.steps):
        question, corpus = examples[step % len(examples)]
        passages: list[Passage] = [corpus[question.doc_id]]
        passages += [corpus.passages[rng.randrange(len(corpus.passages))] for _ in range(rng.randrange(0, 5))]
        rng.shuffle(passages)
        answer = reader.read_many([question.question], [passages], max_new_tokens=16)[0].text
        prompt = build_prompt(tokenizer, question.question, format_context(passages))
        ids = tokenizer(prompt + answer, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = ids[:, -MAX_DISTILL_TOKENS:]
        with torch.no_grad():
            target = teacher(input_ids=ids).logits.log_softmax(-1)
        logp = student(input_ids=ids).logits.log_softmax(-1)
        loss = (target.exp() * (target - logp)).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if (step + 1) % 10 == 0:
            print(f"[distill] step {step + 1}/{args.steps} KL {sum(losses[-10:]) / 10:.4f}", file=sys.stderr,
                  flush=True)
    out = OUT / "distilled-adapter"
    student.save_pretrained(out)
    write_json_atomic(out / "training.json", {"steps": args.steps, "lr": args.lr, "r": LORA_R,
                                               "first_10_kl": sum(losses[:10]) / 10,
                                               "last_10_kl": sum(losses[-10:]) / 10,
                                               "prompts": "non-held-out nq and squad train questions, gold passage "
                                                          "+ 0-4 random passages, fp32 greedy answer"})
    print(f"[distill] adapter in {out}", file=sys.stderr)


def speed(args) -> None:
    """Milliseconds of one SmolLM2 MLP projection (576 -> 1536) in each format, for 1 token (a decoding step) and
    200 (a prompt), one thread, median of `--repeats`: the formats' own kernels, apart from answer lengths."""
    import statistics

    import bitsandbytes as bnb
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    from unirag.quantization import pack_for_cpu

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dense = torch.nn.Linear(576, 1536, bias=False)
    hqq = HQQLinear(torch.nn.Linear(576, 1536, bias=False), BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                    compute_dtype=torch.float32, device="cpu")
    nf4 = bnb.nn.Linear4bit(576, 1536, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    nf4.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    nf4 = nf4.to("cpu")  # quantises
    packed = pack_for_cpu(torch.nn.Sequential(
        HQQLinear(torch.nn.Linear(576, 1536, bias=False), BaseQuantizeConfig(nbits=4, group_size=32, axis=1),
                  compute_dtype=torch.float32, device="cpu")))
    out = {}
    for tokens in (1, 200):
        x = torch.randn(1, tokens, 576)
        for name, layer in (("fp32", dense), ("nf4", nf4), ("hqq-g32", hqq),
                            ("4bit (hqq-g32-cpu-int4)", packed)):
            times = []
            with torch.no_grad():
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    layer(x)
                    times.append((time.perf_counter() - start) * 1000)
            out[f"{name}, {tokens} token(s)"] = round(statistics.median(times), 3)
    if args.answers:
        out.update(answer_speed(args.answers))
    print(json.dumps(out))


def answer_speed(n: int) -> dict[str, float]:
    """Whole answers, as the app reads: the gold passage of `n` held-out nq train questions, one question at a
    time, greedy, 32 new tokens at most, read in turn by the recovered 4-bit and by NF4 (question by question,
    so a drift in the machine's speed hits both): median seconds an answer each, and the median of the ratios."""
    import statistics

    from unirag.backbones import load_llm
    from unirag.rag import Reader

    corpus, questions = _data("nq")
    valid = held_out("nq", questions)[0][:n]
    readers = {p: Reader(*load_llm(None, precision=p)) for p in ("4bit", "nf4")}
    seconds: dict[str, list[float]] = {p: [] for p in readers}
    for question in valid:
        passage = corpus[question.doc_id]
        for precision, reader in readers.items():
            start = time.perf_counter()
            reader.read_many([question.question], [[passage]], max_new_tokens=32)
            seconds[precision].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(seconds["4bit"], seconds["nf4"], strict=True)]
    return {"answers": n, "4bit s an answer": round(statistics.median(seconds["4bit"]), 2),
            "nf4 s an answer": round(statistics.median(seconds["nf4"]), 2),
            "4bit / nf4, median of per-question ratios": round(statistics.median(ratios), 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--lever", choices=sorted(LEVERS), required=True)
    m.add_argument("--n", type=int, default=60, help="held-out train questions per corpus (KL on all of them)")
    m.add_argument("--generate", type=int, default=8,
                   help="of those, how many are also answered greedily (accuracy, agreement; the fp32 reference "
                        "answers all)")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--record", action="store_true", help="append one row per corpus to the results store")
    r = sub.add_parser("record", help="append the rows of levers already measured (runs/four_bit_recovery/L.json)")
    r.add_argument("levers", nargs="+", choices=sorted(LEVERS))
    t = sub.add_parser("speed", help="ms of one projection in each format (kernels alone); --answers N: seconds "
                                     "of whole answers, 4bit against nf4")
    t.add_argument("--repeats", type=int, default=300)
    t.add_argument("--answers", type=int, default=0, help="also time N whole gold-passage answers in 4bit and nf4")
    d = sub.add_parser("distill")
    d.add_argument("--steps", type=int, default=60)
    d.add_argument("--lr", type=float, default=2e-4)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.command == "record":
        for lever in args.levers:
            record_rows(json.loads((OUT / f"{lever}.json").read_text()),
                        f"python -m benchmarks.four_bit_recovery measure --lever {lever}")
        return
    {"measure": measure, "distill": distill, "speed": speed}[args.command](args)


if __name__ == "__main__":
    main()
