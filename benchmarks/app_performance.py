"""App performance benchmark: start to the first answer (warm or fresh cache), per-question latency, several users.

It measures what a user gets: it launches `python app.py` as a fresh process, asks through the app's HTTP API
(gradio_client, the same call as the Ask button) with the corpus's start settings (the checkpoint's recommended
setting, the store's baseline), and reads the server's memory from /proc.

    python -m benchmarks.app_performance                                 # warm caches, 4bit, nq
    python -m benchmarks.app_performance --fresh-cache --concurrent 4 --store

Figures (printed as one JSON line, also written to --out; `--store` appends a results-store row):
- start_to_first_answer_s: process spawn → the first question answered on both sides; with `--fresh-cache` the
  process gets an empty HOME and UNIRAG_CACHE (a fresh machine after the install: nothing converted, embedded or
  quantised yet); the start timeline (each `[unirag]` line of the app's log, seconds after spawn) comes with it;
- latency_s: per-question round trip over `--questions` dev questions after the first, median / p90 / max;
- concurrent: `--concurrent N` questions sent at once after those, each on its own client: when the last one is
  answered, against one question's median latency (the target: within 2x). They go through `/ask` as one
  question does, so the app batches them (`unirag.batching`; the batch size is the app's `UNIRAG_MAX_BATCH`);
- rss_mb_after_warmup / peak_rss_mb: VmRSS / VmHWM of the server process at the end.
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
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def fresh_environment(root: Path) -> dict[str, str]:
    """The environment of a machine that has never run the app: empty HOME, cache and hub folders."""
    env = dict(os.environ)
    for name, sub in (("HOME", "home"), ("UNIRAG_CACHE", "unirag-cache"), ("HF_HOME", "hf"),
                      ("XDG_CACHE_HOME", "xdg-cache"), ("GRADIO_TEMP_DIR", "gradio")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[name] = str(root / sub)
    return env


class TimedLog:
    """Copies the server's output to a file, stamping each `[unirag]` line with the seconds since `start`."""

    def __init__(self, proc: subprocess.Popen, path: Path, start: float) -> None:
        self.timeline: list[list] = []
        self._thread = threading.Thread(target=self._copy, args=(proc, path, start), daemon=True)
        self._thread.start()

    def _copy(self, proc: subprocess.Popen, path: Path, start: float) -> None:
        with path.open("w") as handle:
            for line in proc.stdout:  # type: ignore[union-attr]
                handle.write(line)
                handle.flush()
                if line.startswith("[unirag]"):
                    self.timeline.append([round(time.perf_counter() - start, 1), line.strip()[len("[unirag] "):]])


def answered(result: tuple) -> bool:
    return "ur-answer" in result[1] and "ur-answer" in result[6]


def concurrent_round(url: str, corpus: str, questions: list[str]) -> list[float]:
    """Each question from its own client at once: seconds from the common start to each answer."""
    from gradio_client import Client

    clients = [Client(url, verbose=False) for _ in questions]
    start = time.perf_counter()

    def one(i: int) -> float:
        result = clients[i].predict(corpus, questions[i], api_name="/ask")
        if not answered(result):
            raise SystemExit(f"concurrent question {i} got an incomplete answer")
        return time.perf_counter() - start

    with ThreadPoolExecutor(len(questions)) as pool:
        return sorted(pool.map(one, range(len(questions))))


def max_batch_default() -> int:
    from unirag.batching import MAX_BATCH

    return MAX_BATCH


def max_batch() -> int:
    """The batch size the app under test runs with (it inherits this process's environment)."""
    return int(os.environ.get("UNIRAG_MAX_BATCH") or max_batch_default())


def store_row(summary: dict, command: str) -> dict:
    from unirag.results import APP_PERFORMANCE_PREFIX, METRIC_KEYS, machine, validate_row

    cache = "fresh cache" if summary["fresh_cache"] else "warm cache"
    metrics = {k: None for k in METRIC_KEYS}
    metrics.update({k: summary[k] for k in ("start_to_first_answer_s", "server_up_s", "latency_median_s",
                                            "latency_p90_s", "latency_max_s", "concurrent_last_s",
                                            "concurrent_ratio", "rss_mb_after_warmup", "peak_rss_mb")
                    if summary.get(k) is not None})
    batch = summary.get("max_batch")
    # A batch size other than the app's default is an ablation: its own row, not a replacement of the default's.
    ablation = f", max batch {batch}" if batch not in (None, max_batch_default()) else ""
    row = {"run": f"{APP_PERFORMANCE_PREFIX}{cache}, {summary['precision']}, {summary['corpus']}{ablation}",
           "system": "joint", "corpus": summary["corpus"], "split": "dev", "precision": summary["precision"],
           "n": summary["n"], "settings": {"fresh_cache": summary["fresh_cache"], "concurrent": summary["concurrent"],
                                           "app_args": summary["app_args"], "start_settings": True,
                                           "max_batch": summary.get("max_batch")},
           "metrics": metrics, "command": command, "date": time.strftime("%Y-%m-%d"), "machine": machine(),
           "source": "python -m benchmarks.app_performance", "labels": {"timeline": summary["timeline"]}}
    return validate_row(row, "app performance row")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", choices=["4bit", "nf4", "fp32"], default="4bit")
    parser.add_argument("--questions", type=int, default=5, help="timed dev questions after the first")
    parser.add_argument("--concurrent", type=int, default=0, help="then this many questions at once (0 = skip)")
    parser.add_argument("--corpus", default="nq")
    parser.add_argument("--fresh-cache", action="store_true",
                        help="an empty HOME and cache for the app process: a fresh machine's first start")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None, help="also write the JSON summary here")
    parser.add_argument("--store", action="store_true", help="append the figures to the results store")
    parser.add_argument("app_args", nargs="*", help="extra arguments for app.py (after --)")
    args = parser.parse_args(argv)
    if args.questions < 1 or args.concurrent < 0:
        parser.error("--questions must be at least 1 and --concurrent at least 0")

    from gradio_client import Client

    from unirag.data import dataset_paths, load_questions

    questions = [q.question for q in load_questions(dataset_paths(args.corpus, "dev")[1])]
    wanted = 1 + args.questions + args.concurrent
    if len(questions) < wanted:
        raise SystemExit(f"{args.corpus}/dev has only {len(questions)} questions; {wanted} wanted.")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    scratch = Path(tempfile.mkdtemp(prefix="unirag-bench-"))
    log = scratch / "app.log"
    env = fresh_environment(scratch / "fresh") if args.fresh_cache else dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--precision", args.precision,
               "--corpus", args.corpus, *args.app_args]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    timed = TimedLog(proc, log, start)
    try:
        wait_for_server(url, proc, log, args.timeout)
        server_up = time.perf_counter() - start
        client = Client(url, verbose=False)
        if not answered(client.predict(args.corpus, questions[0], api_name="/ask")):
            raise SystemExit(f"the first answer is incomplete; see {log}")
        first = time.perf_counter() - start
        latencies = []
        for text in questions[1 : args.questions + 1]:
            t0 = time.perf_counter()
            if not answered(client.predict(args.corpus, text, api_name="/ask")):
                raise SystemExit(f"{text!r} got an incomplete answer; see {log}")
            latencies.append(time.perf_counter() - t0)
        together = questions[1 + args.questions : wanted]
        finished = concurrent_round(url, args.corpus, together) if together else []
        memory = memory_mb(proc.pid)
    finally:
        stop_server(proc)
    latencies.sort()
    median = statistics.median(latencies)
    summary = {
        "precision": args.precision, "corpus": args.corpus, "fresh_cache": args.fresh_cache,
        "app_args": args.app_args, "max_batch": max_batch(), "server_up_s": round(server_up, 1),
        "start_to_first_answer_s": round(first, 1), "n": len(latencies),
        "latency_median_s": round(median, 2), "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2),
        "latency_max_s": round(latencies[-1], 2), "concurrent": len(finished),
        "concurrent_s": [round(t, 2) for t in finished],
        "concurrent_last_s": round(finished[-1], 2) if finished else None,
        "concurrent_ratio": round(finished[-1] / median, 2) if finished else None,
        "rss_mb_after_warmup": round(memory.get("VmRSS", float("nan")), 0),
        "peak_rss_mb": round(memory.get("VmHWM", float("nan")), 0),
        "cpu_count": os.cpu_count(), "timeline": timed.timeline, "log": str(log),
    }
    line = json.dumps(summary)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    if args.store:
        from unirag.results import append_run

        invocation = "python -m benchmarks.app_performance " + " ".join(argv if argv is not None else sys.argv[1:])
        print(f"recorded in {append_run(store_row(summary, invocation), replace=True)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
