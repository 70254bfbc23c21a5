"""App performance benchmark: cold start to the first answer, per-question latency, resident memory.

It measures what a user gets: it launches `python app.py` as a fresh process, asks through the app's
HTTP API (gradio_client, the same call as the Ask button), and reads the server's memory from /proc.

    python -m benchmarks.app_performance --precision 4bit     # the app's default
    python -m benchmarks.app_performance --precision fp32

Figures (printed as one JSON line, also written to --out):
- cold_start_to_first_answer_s: process spawn → the first question answered on both sides (model and
  corpus loading, server start, the first answer; caches of converted weights and embeddings warm, as
  after `make app` has run once);
- latency_s: per-question round trip over `--questions` nq/dev questions (both sides, app defaults:
  beam 10, 2 documents, RAG k=5, 32 new tokens), median / p90 / max;
- rss_mb_after_warmup / peak_rss_mb: VmRSS / VmHWM of the server process after the timed questions.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from unirag.settings import JOINT_READERS

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    """Block until the app at `url` serves its config (also used by the app tests)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "config", timeout=5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"app not up after {timeout:.0f}s:\n{log.read_text()[-3000:]}")


def stop_server(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Terminate the app, killing it if it does not exit within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["4bit", "fp32"], default="4bit")
    parser.add_argument("--questions", type=int, default=20, help="timed nq/dev questions after the first")
    parser.add_argument("--corpus", default="nq")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    parser.add_argument("--joint-reader", choices=JOINT_READERS, default="trained",
                        help="who reads the joint model's documents (the app's 'Joint reader' setting)")
    parser.add_argument("--k-docs", type=int, default=2, help="documents the joint model reads")
    parser.add_argument("--self-check", type=int, default=0,
                        help="the joint side re-reads its top N documents (the app's 'Self-check'; 0 = off)")
    parser.add_argument("app_args", nargs="*", help="extra arguments for app.py (after --)")
    args = parser.parse_args(argv)

    from gradio_client import Client

    from unirag.data import dataset_paths, load_questions

    questions = load_questions(dataset_paths(args.corpus, "dev")[1])
    if len(questions) < args.questions + 1:
        raise SystemExit(f"{args.corpus}/dev has only {len(questions)} questions.")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = Path(tempfile.mkdtemp(prefix="unirag-bench-")) / "app.log"
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--precision", args.precision,
               "--corpus", args.corpus, *args.app_args]
    # the app's defaults: beam width, documents, RAG k, max new tokens, joint reader, self-check
    settings = (10, args.k_docs, 5, 32, args.joint_reader, args.self_check)
    with log.open("w") as handle:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            wait_for_server(url, proc, log, args.timeout)
            server_up = time.perf_counter() - start
            client = Client(url, verbose=False)
            first = client.predict(args.corpus, questions[0].question, *settings, api_name="/ask")
            cold = time.perf_counter() - start
            if "ur-answer" not in first[1] or "ur-answer" not in first[6]:
                raise SystemExit(f"the first answer is incomplete; see {log}")
            latencies = []
            for q in questions[1 : args.questions + 1]:
                t0 = time.perf_counter()
                result = client.predict(args.corpus, q.question, *settings, api_name="/ask")
                latencies.append(time.perf_counter() - t0)
                if "ur-answer" not in result[1] or "ur-answer" not in result[6]:
                    raise SystemExit(f"question {q.id} got an incomplete answer; see {log}")
            memory = memory_mb(proc.pid)
        finally:
            stop_server(proc)
    latencies.sort()
    summary = {
        "precision": args.precision,
        "corpus": args.corpus,
        "joint_reader": args.joint_reader,
        "k_docs": args.k_docs,
        "self_check": args.self_check,
        "server_up_s": round(server_up, 1),
        "cold_start_to_first_answer_s": round(cold, 1),
        "n": len(latencies),
        "latency_median_s": round(statistics.median(latencies), 2),
        "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
        "latency_max_s": round(latencies[-1], 2),
        "rss_mb_after_warmup": round(memory.get("VmRSS", float("nan")), 0),
        "peak_rss_mb": round(memory.get("VmHWM", float("nan")), 0),
        "cpu_count": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    line = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
