"""unirag.settings: validation, the recommended settings a checkpoint ships, and the order of precedence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from unirag.errors import UniragError
from unirag.settings import LIMITS, NO_CACHE_BEAM, RECOMMENDED_FILE, InferenceSettings, RecommendedSettings

APP_KEYS = ("k_docs", "beam_width", "self_check", "self_check_weight", "joint_reader")


def _app_values(settings: InferenceSettings) -> dict:
    return {key: getattr(settings, key) for key in APP_KEYS}


# --------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), 1e7, True, "4"])
def test_self_check_rejects_bad_weights(bad):
    with pytest.raises(UniragError, match="self_check_weight"):
        InferenceSettings(self_check=3, self_check_weight=bad)


@pytest.mark.parametrize("bad", [1, -1, 33])
def test_self_check_rejects_bad_sizes(bad):
    with pytest.raises(UniragError, match="self_check"):
        InferenceSettings(self_check=bad)
    with pytest.raises(UniragError, match="self_check"):
        InferenceSettings().replace(self_check=bad)


@pytest.mark.parametrize("name", sorted(LIMITS))
def test_whole_number_knobs_are_checked_against_their_limits(name):
    low, high = LIMITS[name]
    assert getattr(InferenceSettings(**{name: high}), name) == high
    assert getattr(InferenceSettings(**{name: float(high)}), name) == high  # sliders send 2.0
    assert getattr(InferenceSettings(**{name: str(high)}), name) == high
    for bad in (high + 1, low - 1):
        with pytest.raises(UniragError, match=f"{name} must be between {low} and {high}"):
            InferenceSettings(**{name: bad})
    for bad in (True, 2.5, "many", None):
        with pytest.raises(UniragError, match=f"{name} must be a whole number"):
            InferenceSettings(**{name: bad})


def test_reader_precision_and_unknown_names():
    assert InferenceSettings(precision="NF4").precision == "nf4"  # bitsandbytes, no recovery
    assert InferenceSettings(precision="int4").precision == "4bit"  # the recovered 4-bit
    assert InferenceSettings(precision="float32").precision == "fp32"
    with pytest.raises(UniragError, match="Unknown precision"):
        InferenceSettings(precision="int8")
    with pytest.raises(UniragError, match="joint_reader"):
        InferenceSettings(joint_reader="lora")
    with pytest.raises(UniragError, match="Unknown setting"):
        InferenceSettings.from_existing(None, beam=3)


def test_search_is_sized_for_every_document_read_or_checked():
    settings = InferenceSettings(k_docs=2, beam_width=4, self_check=8)
    assert (settings.search_width, settings.documents_searched) == (8, 8)
    assert (InferenceSettings(k_docs=3, beam_width=1).search_width, InferenceSettings(k_docs=3).documents_searched) \
        == (3, 3)


# --------------------------------------------------------------------------------------------- recommended settings


def test_recommended_settings_round_trip_and_app_values(tmp_path):
    assert RecommendedSettings.load(tmp_path, "4bit") is None  # a checkpoint may ship none
    rec = RecommendedSettings({"k_docs": 1, "beam_width": 32, "self_check": 32, "self_check_weight": 16.0},
                              "held-out")
    rec.save(tmp_path, "4bit")
    assert RecommendedSettings.load(tmp_path, "4bit") == rec
    with_cache = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=True)
    assert _app_values(with_cache) == {"k_docs": 1, "beam_width": 32, "self_check": 32, "self_check_weight": 16.0,
                                       "joint_reader": "trained"}
    assert not with_cache.notices
    # Without the cache a 32-document self-check re-reads 32 passages in full: off, and the beam back to 10.
    without = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=False)
    assert _app_values(without) == {"k_docs": 1, "beam_width": NO_CACHE_BEAM, "self_check": 0,
                                    "self_check_weight": 16.0, "joint_reader": "trained"}
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    RecommendedSettings({"beam_width": 4, "self_check": 3}).save(narrow, "4bit")
    assert InferenceSettings.from_existing(narrow, "4bit", passage_cache=False).beam_width == 4
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / RECOMMENDED_FILE).write_text(json.dumps({**rec.values, "reason": rec.reason}))
    # One setting for every precision.
    assert RecommendedSettings.load(shared, "fp32") == RecommendedSettings.load(shared, "4bit") == rec


def test_recommended_settings_per_precision(tmp_path):
    (tmp_path / RECOMMENDED_FILE).write_text(json.dumps({
        "4bit": {"beam_width": 32, "self_check": 20, "reason": "held-out"},
        "fp32": {"beam_width": 32, "self_check": 20, "joint_reader": "base", "reason": "held-out"}}))
    assert InferenceSettings.from_existing(tmp_path, "4bit").joint_reader == "trained"
    fp32 = RecommendedSettings.load(tmp_path, "fp32")
    assert fp32.values["joint_reader"] == "base"
    assert InferenceSettings.from_existing(tmp_path, "fp32", passage_cache=True).joint_reader == "base"
    with pytest.raises(TypeError):  # which precision to load is not optional
        RecommendedSettings.load(tmp_path)
    with pytest.raises(UniragError, match="Unknown precision"):
        RecommendedSettings.load(tmp_path, precision="int8")
    (tmp_path / RECOMMENDED_FILE).write_text(json.dumps({"4bit": {"k_docs": 1}}))
    assert RecommendedSettings.load(tmp_path, precision="fp32") is None  # nothing measured for fp32


@pytest.mark.parametrize("text, match", [
    ('{"k_docs": 4}', "k_docs"),
    ('{"k_docs": true}', "k_docs"),
    ('{"beam_width": 0}', "beam_width"),
    ('{"self_check": 1, "beam_width": 10}', "self_check"),
    ('{"self_check": 2.5}', "self_check"),
    ('{"self_check_weight": 0}', "self_check_weight"),
    ('{"beam": 10}', "unknown setting"),
    ('{"joint_reader": "lora"}', "joint_reader"),
    ('{"4bit": {"k_docs": 1}, "gpu": {}}', "unknown key"),
    ('{"4bit": [1]}', "must be a JSON object"),
    ('{"4bit": {"beam": 3}}', "unknown setting"),
    ('{"reason": 3}', "reason"),
    ('[1, 2]', "JSON object"),
    ('{not json', "readable JSON"),
])
def test_recommended_settings_bad_files_are_clear_errors(tmp_path, text, match):
    (tmp_path / RECOMMENDED_FILE).write_text(text)
    with pytest.raises(UniragError, match=match):
        RecommendedSettings.load(tmp_path, precision="4bit")
    with pytest.raises(UniragError, match=match):
        InferenceSettings.from_existing(tmp_path, "4bit")


def test_shipped_checkpoints_recommend_valid_settings():
    root = Path(__file__).resolve().parent.parent / "checkpoints"
    shipped = sorted(p for p in root.glob("*-smollm2") if (p / "joint_config.json").is_file())
    if not shipped:
        pytest.skip("no shipped checkpoints in this checkout")
    for ckpt in shipped:
        for precision in ("4bit", "fp32"):
            rec = RecommendedSettings.load(ckpt, precision=precision)
            assert rec is not None and rec.reason, f"{ckpt.name} ships no recommended {precision} setting"
            assert "held-out" in rec.reason  # chosen on held-out train questions, never on dev
            InferenceSettings.from_existing(ckpt, precision, passage_cache=False)  # valid without a cache too


# --------------------------------------------------------------------------------------------- precedence


def test_explicit_beats_recommended_beats_default(tmp_path):
    (tmp_path / RECOMMENDED_FILE).write_text(json.dumps({
        "4bit": {"k_docs": 2, "beam_width": 16, "self_check": 4, "self_check_weight": 8.0},
        "fp32": {"k_docs": 3, "joint_reader": "base"}}))
    default = InferenceSettings()
    nf4 = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=True)
    assert (nf4.k_docs, nf4.beam_width, nf4.self_check, nf4.self_check_weight) == (2, 16, 4, 8.0)
    assert (nf4.max_new_tokens, nf4.rag_k, nf4.joint_reader) == (default.max_new_tokens, default.rag_k, "trained")
    fp32 = InferenceSettings.from_existing(tmp_path, "fp32", passage_cache=True)  # the loaded precision's entry
    assert (fp32.k_docs, fp32.joint_reader, fp32.beam_width, fp32.precision) == (3, "base", default.beam_width, "fp32")
    explicit = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=True, k_docs=1, self_check_weight=2.0,
                                               max_new_tokens=8, beam_width=None)
    assert (explicit.k_docs, explicit.self_check_weight, explicit.max_new_tokens) == (1, 2.0, 8)
    assert explicit.beam_width == 16  # None is "not given": the recommended value stays
    assert InferenceSettings.from_existing(None, "fp32") == InferenceSettings(precision="fp32")


def test_no_cache_switches_a_recommended_self_check_off_with_a_notice(tmp_path):
    (tmp_path / RECOMMENDED_FILE).write_text(json.dumps({"beam_width": 32, "self_check": 20, "k_docs": 1}))
    off = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=False)
    assert (off.self_check, off.beam_width, off.k_docs) == (0, NO_CACHE_BEAM, 1)
    assert len(off.notices) == 1 and "self-check 20" in off.notices[0] and "passage cache" in off.notices[0]
    # An explicit self-check is kept as given, without a notice.
    kept = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=False, self_check=3)
    assert (kept.self_check, kept.beam_width, kept.notices) == (3, 32, ())


def test_without_cache_setting_applies_only_without_a_passage_cache(tmp_path):
    """A checkpoint's `without_cache` entry (measured on its own) replaces the generic no-cache rule."""
    (tmp_path / RECOMMENDED_FILE).write_text(json.dumps({"4bit": {
        "beam_width": 32, "self_check": 20, "self_check_weight": 16.0, "reason": "row A",
        "without_cache": {"beam_width": 12, "self_check": 3, "reason": "row B"}}}))
    rec = RecommendedSettings.load(tmp_path, "4bit")
    assert rec.without_cache.values == {"beam_width": 12, "self_check": 3} and rec.without_cache.reason == "row B"
    cached = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=True)
    assert (cached.beam_width, cached.self_check, cached.notices) == (32, 20, ())
    fresh = InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=False)
    assert (fresh.beam_width, fresh.self_check, fresh.self_check_weight) == (12, 3, 16.0)
    assert "row B" in fresh.notices[0]
    assert InferenceSettings.from_existing(tmp_path, "4bit", passage_cache=False, self_check=20).self_check == 20
    (tmp_path / "copy").mkdir()
    rec.save(tmp_path / "copy", "4bit")
    assert RecommendedSettings.load(tmp_path / "copy", "4bit") == rec  # round trip keeps the fallback
    for bad in ({"without_cache": 3}, {"without_cache": {"self_check": 1}}, {"without_cache": {"colour": 1}},
                {"without_cache": {"without_cache": {}}}, {"reason": "two\nlines"}):
        (tmp_path / RECOMMENDED_FILE).write_text(json.dumps({"4bit": {"self_check": 20, **bad}}))
        with pytest.raises(UniragError):
            RecommendedSettings.load(tmp_path, "4bit")
