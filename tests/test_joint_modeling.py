"""JointModel: exactness, pathway/bridge, KV cache, GQA, checkpoints, LoRA (tiny random models, offline)."""

from __future__ import annotations

import json

import pytest
import torch

from unirag.backbones import load_llm
from unirag.errors import FingerprintMismatchError, UniragError
from unirag.joint.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_lora_reader
from unirag.joint.config import JointConfig
from unirag.joint.modeling import JointModel, JointOutput

KINDS = ["llama", "qwen2", "qwen3"]


def make_joint(path, attn: str = "eager", tokenizer: bool = True, **overrides) -> JointModel:
    base, tok = load_llm(str(path), attn_implementation=attn)
    cfg = {"base_model": str(path), "docid_levels": 3, "docid_branching": 4, "pathway_layers": 2,
           "retrieval_heads": 3, "retrieval_mlp_dim": 32, "bridge_heads": 4}
    cfg.update(overrides)
    model = JointModel(base, JointConfig(**cfg), tokenizer=tok if tokenizer else None)
    model.tokenizer = tok
    return model.eval()


@torch.no_grad()
def randomise(model: JointModel, std: float = 0.2, seed: int = 0) -> None:
    """Give every new parameter (incl. the zero-initialised ones) random values."""
    gen = torch.Generator().manual_seed(seed)
    for _, param in model.joint_named_parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * std)


def sample_ids(model: JointModel, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 90, (batch, length), generator=gen)


def docid_sequence(model: JointModel, tok, question: str = "Q: who wrote it?\n", docid=(1, 3, 0)) -> torch.Tensor:
    ids = tok(question)["input_ids"] + [model.retrieve_token_id]
    ids += [model.docid_token_id(level, s) for level, s in enumerate(docid)]
    return torch.tensor([ids])


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", KINDS)
def test_base_exact_with_pathway_and_bridge_off(tiny_llm_dirs, kind):
    model = make_joint(tiny_llm_dirs[kind])
    reference, _ = load_llm(str(tiny_llm_dirs[kind]))
    ids = sample_ids(model)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask).logits
        fresh_on = model(ids, attention_mask=mask, pathway=True, bridge=True).lm_logits
        randomise(model)
        off = model(ids, attention_mask=mask, pathway=False, bridge=False).lm_logits
        on = model(ids, attention_mask=mask, pathway=True, bridge=True).lm_logits
    # Zero-initialised r_down / bridge output make a fresh model exact even with everything on.
    torch.testing.assert_close(fresh_on, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(off, expected, atol=1e-5, rtol=0)
    assert (on - expected).abs().max() > 1e-3  # the randomised pathway does change things


def test_base_exact_under_sdpa(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"], attn="sdpa")
    reference, _ = load_llm(str(tiny_llm_dirs["llama"]), attn_implementation="sdpa")
    randomise(model)
    ids = sample_ids(model)
    with torch.no_grad():
        torch.testing.assert_close(
            model(ids, pathway=False, bridge=False).lm_logits, reference(ids).logits, atol=1e-5, rtol=0
        )


def test_base_model_called_directly_is_unchanged(tiny_llm_dirs):
    """Outside JointModel.forward the wrapped base behaves like the original (no side channel active)."""
    model = make_joint(tiny_llm_dirs["qwen3"])
    reference, _ = load_llm(str(tiny_llm_dirs["qwen3"]))
    randomise(model)
    ids = sample_ids(model)
    with torch.no_grad():
        torch.testing.assert_close(model.base(ids).logits, reference(ids).logits, atol=1e-5, rtol=0)


def test_pathway_and_bridge_change_outputs(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"])
    randomise(model)
    ids = sample_ids(model)
    with torch.no_grad():
        off = model(ids, pathway=False, bridge=False)
        path = model(ids, pathway=True, bridge=False)
        both = model(ids, pathway=True, bridge=True)
    assert (path.lm_logits - off.lm_logits).abs().max() > 1e-3
    assert (path.docid_logits - off.docid_logits).abs().max() > 1e-3
    assert (both.docid_logits - path.docid_logits).abs().max() > 1e-3
    assert off.docid_logits.shape == (2, 9, 3 * 4 + 1)
    with pytest.raises(UniragError):
        model(ids, pathway=False, bridge=True)
    with torch.no_grad():
        last = model(ids, pathway=True, bridge=True, logits_to_keep=1)
    assert last.lm_logits.shape[1] == 1 and torch.allclose(last.lm_logits, both.lm_logits[:, -1:], atol=1e-5)


@pytest.mark.parametrize("layers", [3, [0, 1, 2], [0, -1]])
def test_pathway_layer_choices(tiny_llm_dirs, layers):
    model = make_joint(tiny_llm_dirs["llama"], pathway_layers=layers)
    expected = [0, 1, 2] if layers in (3, [0, 1, 2]) else [0, 2]
    assert model.pathway_layer_ids == expected
    randomise(model)
    with torch.no_grad():
        out = model(sample_ids(model), output_attentions=True)
    assert len(out.retrieval_attentions) == len(expected)
    assert out.bridge_attentions.shape == (2, 4, 9, 9)
    assert all(a is not None for a in out.attentions)


@pytest.mark.parametrize("bad", [0, 4, [], [3], [-4]])
def test_bad_pathway_layers(tiny_llm_dirs, bad):
    with pytest.raises(UniragError):
        make_joint(tiny_llm_dirs["llama"], pathway_layers=bad)


def test_config_validation_and_json_roundtrip(tiny_llm_dirs):
    with pytest.raises(UniragError):
        JointConfig(docid_levels=0, docid_branching=4)
    with pytest.raises(UniragError, match="bridge_heads"):
        make_joint(tiny_llm_dirs["llama"], bridge_heads=5)  # 64 % 5 != 0
    cfg = JointConfig(docid_levels=3, docid_branching=8, pathway_layers=[1, 2], base_model="x")
    again = JointConfig.from_dict(json.loads(json.dumps({**cfg.to_dict(), "future_field": 1})))
    assert again == cfg


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("retrieval_heads", "4", "a whole number"),
    ("docid_levels", True, "a whole number"),
    ("pathway_layers", [1, "2"], "a whole number or a list of layer indices"),
    ("base_model", 3, "a string or null"),
    ("adapter_in_reading", "yes", "true or false"),
    ("lora", [], "an object or null"),
])
def test_config_from_dict_checks_types_and_names_the_file(key, value, expected):
    data = {**JointConfig(docid_levels=3, docid_branching=8).to_dict(), key: value}
    with pytest.raises(UniragError, match=rf"ckpt/joint_config.json: '{key}' must be {expected}, got"):
        JointConfig.from_dict(data, source="ckpt/joint_config.json")
    with pytest.raises(UniragError, match="docid_branching missing"):
        JointConfig.from_dict({"docid_levels": 3})


def test_a_mistyped_checkpoint_config_is_a_clear_error(tiny_llm_dirs, tmp_path):
    ckpt = make_joint(tiny_llm_dirs["llama"]).save_pretrained(tmp_path / "ckpt")
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    meta["config"]["retrieval_heads"] = "4"  # a hand-edited file: a TypeError deep in the model before
    (ckpt / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UniragError, match=r"Invalid joint config in .*joint_config.json: 'retrieval_heads' must be "
                                          r"a whole number, got '4' \(str\)"):
        JointModel.from_pretrained(ckpt)


@pytest.mark.parametrize(("requested", "expected"), [(1, 2), (2, 2), (3, 4), (4, 4), (5, 6)])
def test_gqa_head_rounding(tiny_llm_dirs, requested, expected):
    model = make_joint(tiny_llm_dirs["llama"], retrieval_heads=requested)  # 2 KV heads
    assert model.num_retrieval_heads == expected
    pw = model.pathways["2"]
    assert pw.r_q_proj.out_features == expected * 16


def test_query_warm_start_follows_gqa_groups(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"], retrieval_heads=4)  # 4 base heads, 2 KV heads, 4 r-heads
    attn = model.decoder.layers[2].self_attn
    pw = model.pathways["2"]
    d = 16
    # r-head j reads KV head j // 2; base head for KV group g starts at g * 2.
    for j, src in enumerate([0, 1, 2, 3]):
        torch.testing.assert_close(pw.r_q_proj.weight[j * d:(j + 1) * d], attn.q_proj.weight[src * d:(src + 1) * d])
    model6 = make_joint(tiny_llm_dirs["qwen2"], retrieval_heads=6)  # 6 r-heads: 3 per KV group, repeats
    pw6, attn6 = model6.pathways["2"], model6.decoder.layers[2].self_attn
    assert pw6.r_q_proj.bias is not None  # Qwen2 has q/k/v bias
    for j, src in enumerate([0, 1, 0, 2, 3, 2]):
        torch.testing.assert_close(pw6.r_q_proj.weight[j * d:(j + 1) * d], attn6.q_proj.weight[src * d:(src + 1) * d])
        torch.testing.assert_close(pw6.r_q_proj.bias[j * d:(j + 1) * d], attn6.q_proj.bias[src * d:(src + 1) * d])


def test_qwen3_pathway_has_own_q_norm(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["qwen3"])
    pw = model.pathways["2"]
    base_norm = model.decoder.layers[2].self_attn.q_norm
    assert pw.r_q_norm is not None and pw.r_q_norm is not base_norm
    torch.testing.assert_close(pw.r_q_norm.weight, base_norm.weight)
    assert make_joint(tiny_llm_dirs["llama"]).pathways["2"].r_q_norm is None


# ------------------------------------------------------------------------------------------- KV cache


def assert_incremental_equals_full(model: JointModel) -> JointOutput:
    """A docid sequence decoded token by token with the KV cache (pathway and bridge on) gives the full forward's
    docid and LM logits; returns the full forward."""
    ids = docid_sequence(model, model.tokenizer)
    prompt_len = ids.shape[1] - 3
    with torch.no_grad():
        full = model(ids, pathway=True, bridge=True)
        out = model(ids[:, :prompt_len], use_cache=True)
        steps = [out.docid_logits[:, -1]]
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.docid_logits[:, -1])
    incremental = torch.stack(steps, dim=1)
    torch.testing.assert_close(incremental, full.docid_logits[:, prompt_len - 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.lm_logits[:, -1], full.lm_logits[:, -1], atol=1e-5, rtol=0)
    return full


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_incremental_decoding_matches_full_forward(tiny_llm_dirs, kind):
    model = make_joint(tiny_llm_dirs[kind])
    randomise(model)
    assert_incremental_equals_full(model)


def test_cache_reindexing_for_beams(tiny_llm_dirs):
    """batch_select_indices on the joint cache (incl. the bridge layer) follows the chosen beams."""
    model = make_joint(tiny_llm_dirs["llama"])
    randomise(model)
    tok = model.tokenizer
    prompt = docid_sequence(model, tok, docid=())
    a, b = model.docid_token_id(0, 1), model.docid_token_id(0, 2)
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        cache = out.past_key_values
        cache.batch_select_indices(torch.tensor([0, 0]))
        step = model(torch.tensor([[a], [b]]), past_key_values=cache, use_cache=True)
        full_a = model(torch.cat([prompt, torch.tensor([[a]])], 1))
        full_b = model(torch.cat([prompt, torch.tensor([[b]])], 1))
    torch.testing.assert_close(step.docid_logits[0, -1], full_a.docid_logits[0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(step.docid_logits[1, -1], full_b.docid_logits[0, -1], atol=1e-5, rtol=0)


def test_mixing_bridge_settings_in_one_cache_is_refused(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"])
    ids = sample_ids(model, batch=1)
    with torch.no_grad():
        out = model(ids, use_cache=True, bridge=False)
        with pytest.raises(UniragError, match="bridge"):
            model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True, bridge=True)


@pytest.mark.parametrize(("kind", "bridge"), [("qwen2", False), ("llama", True)])
def test_start_layer_forward_matches_full_forward(tiny_llm_dirs, kind, bridge):
    """Training can cache the frozen lower layers and run only the top ones."""
    model = make_joint(tiny_llm_dirs[kind], pathway_layers=2)
    randomise(model)
    ids = sample_ids(model)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    layer = model.pathway_layer_ids[0]
    with torch.no_grad():
        full = model(ids, attention_mask=mask, bridge=bridge)
        hidden = model.hidden_before_layer(ids, mask)
        top = model(None, attention_mask=mask, inputs_embeds=hidden, start_layer=layer, bridge=bridge)
        embeds = model(None, attention_mask=mask, inputs_embeds=model.embed(ids), bridge=bridge)
    real = mask.bool()
    torch.testing.assert_close(top.docid_logits[real], full.docid_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(top.lm_logits[real], full.lm_logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(embeds.docid_logits, full.docid_logits, atol=1e-6, rtol=0)
    with pytest.raises(UniragError):
        model(None, inputs_embeds=hidden, start_layer=layer, use_cache=True)


# ------------------------------------------------------------------------------------------- attentions & embeddings


def test_attention_weights_eager_and_sdpa_agree(tiny_llm_dirs):
    eager = make_joint(tiny_llm_dirs["qwen2"], attn="eager")
    sdpa = make_joint(tiny_llm_dirs["qwen2"], attn="sdpa")
    randomise(eager)
    randomise(sdpa)
    ids = sample_ids(eager)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding
    with torch.no_grad():
        e = eager(ids, attention_mask=mask, output_attentions=True)
        s = sdpa(ids, attention_mask=mask, output_attentions=True)
        s_plain = sdpa(ids, attention_mask=mask)
    torch.testing.assert_close(s.lm_logits, e.lm_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_plain.docid_logits, e.docid_logits, atol=1e-5, rtol=0)
    for x, y in zip(e.retrieval_attentions + (e.bridge_attentions,) + e.attentions,
                    s.retrieval_attentions + (s.bridge_attentions,) + s.attentions, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    r = e.retrieval_attentions[0]
    assert r.shape == (2, eager.num_retrieval_heads, 9, 9)
    torch.testing.assert_close(r.sum(-1), torch.ones(r.shape[:-1]), atol=1e-5, rtol=0)
    assert float(r[..., 0, 1:].abs().max()) == 0.0  # causal


def test_extra_token_ids_and_embeddings(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["qwen2"])
    offset = model.extra_vocab_offset
    assert offset == 200  # the embedding's rows, not len(tokenizer)
    ids = {model.retrieve_token_id, model.generates_token_id, model.end_of_docid_token_id}
    ids |= {model.docid_token_id(level, s) for level in range(3) for s in range(4)}
    assert len(ids) == 3 + 12 and min(ids) == offset and max(ids) == offset + model.num_extra_tokens - 1
    assert model.docid_vocab_index(2, 3) == 11 and model.end_of_docid_index == 12
    assert model.extra_token_name(model.docid_token_id(1, 2)) == "<docid_1_2>"
    mixed = torch.tensor([[5, model.retrieve_token_id, model.docid_token_id(1, 2)]])
    vectors = model.embed(mixed)
    torch.testing.assert_close(vectors[0, 0], model.causal_lm.get_input_embeddings().weight[5])
    torch.testing.assert_close(vectors[0, 1], model.extra_embed.weight[0])
    torch.testing.assert_close(vectors[0, 2], model.extra_embed.weight[2 + 6])
    with pytest.raises(UniragError):
        model.embed(torch.tensor([[offset + model.num_extra_tokens]]))
    with pytest.raises(UniragError):
        model.docid_token_id(3, 0)
    # The docid head starts from the docid tokens' embeddings.
    torch.testing.assert_close(model.docid_head.weight, model.extra_embed.weight[2:])


def test_init_docid_embeddings_from_text(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"])
    emb = model.causal_lm.get_input_embeddings().weight
    tok = model.tokenizer
    n = model.init_docid_embeddings_from_text([["ab", ""], ["c"]])
    assert n == 2
    expected = emb[tok(" ab", add_special_tokens=False)["input_ids"]].mean(0)
    torch.testing.assert_close(model.extra_embed.weight[2 + model.docid_vocab_index(0, 0)], expected)
    torch.testing.assert_close(model.docid_head.weight[model.docid_vocab_index(0, 0)], expected)
    n = model.init_docid_embeddings_from_text({(2, 3): "xyz"}, also_head=False)
    assert n == 1


def test_stage_parameters_and_gradients(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"])
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert len(model.stage1_parameters()) == len(model.stage_parameters(1)) > 0
    assert before == {n: p.requires_grad for n, p in model.named_parameters()}  # no side effects
    stage1 = model.trainable_parameters(1)
    names1 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names1 and all(n.startswith(("pathways.", "docid_head.", "extra_embed.", "entry_embed.")) for n in names1)
    assert sum(p.numel() for p in stage1) == sum(p.numel() for n, p in model.named_parameters() if n in names1)
    model.train()
    ids = docid_sequence(model, model.tokenizer)
    out = model(ids, pathway=True, bridge=False)
    out.docid_logits[0, -4:].logsumexp(-1).sum().backward()
    assert model.pathways["2"].r_down.weight.grad is not None
    assert model.pathways["2"].r_down.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith("base."))
    model.trainable_parameters(2)
    names2 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("bridge.") for n in names2) and names1 < names2


# ------------------------------------------------------------------------------------------- checkpoints


class FakeTree:
    def save(self, path):
        path.write_text(json.dumps({"fake": True}))


def test_save_load_roundtrip_float32(tiny_llm_dirs, tmp_path):
    model = make_joint(tiny_llm_dirs["qwen3"], save_dtype="float32")
    randomise(model)
    out_dir = model.save_pretrained(tmp_path / "ckpt", tree=FakeTree(), extra_files={"notes.json": {"a": 1}})
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == sorted([CONFIG_FILE, WEIGHTS_FILE, "docid_tree.json", "notes.json"])
    meta = json.loads((out_dir / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["base_fingerprint"].startswith(str(tiny_llm_dirs["qwen3"]))
    loaded = JointModel.from_pretrained(out_dir)
    assert loaded.tokenizer is not None and not loaded.training
    ids = sample_ids(model)
    with torch.no_grad():
        a, b = model(ids), loaded(ids)
    torch.testing.assert_close(a.lm_logits, b.lm_logits, atol=0, rtol=0)
    torch.testing.assert_close(a.docid_logits, b.docid_logits, atol=0, rtol=0)


def test_save_fp16_size_and_closeness(tiny_llm_dirs, tmp_path):
    model = make_joint(tiny_llm_dirs["llama"])
    randomise(model, std=0.05)
    out_dir = model.save_pretrained(tmp_path / "ckpt")
    n_params = sum(p.numel() for _, p in model.joint_named_parameters())
    size = (out_dir / WEIGHTS_FILE).stat().st_size
    assert 2 * n_params <= size < 2 * n_params + 20_000  # fp16 storage plus a small header
    assert not list(out_dir.glob("*.bin")) and not list(out_dir.glob("*.pt"))
    loaded = JointModel.from_pretrained(out_dir)
    ids = sample_ids(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).docid_logits, model(ids).docid_logits, atol=2e-2, rtol=0)


def test_fingerprint_mismatch(tiny_llm_dirs, tmp_path):
    model = make_joint(tiny_llm_dirs["llama"])
    out_dir = model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(UniragError, match="no LoRA"):
        load_lora_reader(load_llm(str(tiny_llm_dirs["llama"]))[0], out_dir)  # stage-1 checkpoint
    with pytest.raises(FingerprintMismatchError, match="trained on"):
        JointModel.from_pretrained(out_dir, base_model=str(tiny_llm_dirs["llama4"]))


def test_config_must_describe_the_wrapped_base(tiny_llm_dirs, tmp_path):
    base, _ = load_llm(str(tiny_llm_dirs["llama"]))
    config = JointConfig(base_model=str(tiny_llm_dirs["llama4"]), docid_levels=2, docid_branching=2, pathway_layers=2)
    model = JointModel(base, config)
    with pytest.raises(UniragError, match="base_model"):
        model.save_pretrained(tmp_path / "ckpt")


def test_corrupt_and_incomplete_checkpoints(tiny_llm_dirs, tmp_path):
    model = make_joint(tiny_llm_dirs["llama"])
    good = model.save_pretrained(tmp_path / "ckpt")
    weights = good / WEIGHTS_FILE
    blob = weights.read_bytes()

    weights.write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(UniragError, match="corrupt or truncated"):
        JointModel.from_pretrained(good)

    # Truncated and no checksum to compare with: safetensors itself must fail cleanly.
    meta = json.loads((good / CONFIG_FILE).read_text())
    meta["files"] = {}
    (good / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(UniragError, match="truncated or corrupt"):
        JointModel.from_pretrained(good)

    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(UniragError, match="truncated or corrupt"):
        JointModel.from_pretrained(good)

    weights.unlink()
    with pytest.raises(UniragError, match=WEIGHTS_FILE):
        JointModel.from_pretrained(good)

    (good / CONFIG_FILE).write_text("{not json")
    with pytest.raises(UniragError, match="corrupt"):
        JointModel.from_pretrained(good)
    (good / CONFIG_FILE).unlink()
    with pytest.raises(UniragError, match=CONFIG_FILE):
        JointModel.from_pretrained(good)
    with pytest.raises(UniragError, match="The checkpoint folder .*nowhere does not exist"):
        JointModel.from_pretrained(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------- LoRA


def _lora_module_names(module) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [n for n, m in module.named_modules() if isinstance(m, LoraLayer)]


def test_lora_wraps_base_projections_only(tiny_llm_dirs, tmp_path):
    model = make_joint(tiny_llm_dirs["llama"], pathway_layers=3, save_dtype="float32")
    randomise(model)
    reference, _ = load_llm(str(tiny_llm_dirs["llama"]))
    model.enable_lora(r=4, alpha=8)
    wrapped = _lora_module_names(model)
    assert wrapped and all(n.startswith("base.") for n in wrapped)
    assert not any(part.startswith(("r_", "cross_")) for n in wrapped for part in n.split("."))
    assert len(wrapped) == 3 * 7  # q, k, v, o, gate, up, down in each of 3 layers
    for name in ("pathways", "bridge", "docid_head", "extra_embed"):
        assert not _lora_module_names(getattr(model, name))
    attn = model.decoder.layers[0].self_attn
    assert type(attn).__name__ == "JointAttention" and "lora" in type(attn.q_proj).__module__

    ids = sample_ids(model)
    with torch.no_grad():
        # LoRA B starts at zero: still the base; then the attention must really use the LoRA projections.
        torch.testing.assert_close(model(ids, pathway=False, bridge=False).lm_logits, reference(ids).logits,
                                   atol=1e-5, rtol=0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
        assert (model(ids, pathway=False, bridge=False).lm_logits - reference(ids).logits).abs().max() > 1e-3

    names2 = {n for n, p in model.named_parameters() if p in set(model.trainable_parameters(2))}
    assert any("lora_A" in n for n in names2) and any(n.startswith("bridge.") for n in names2)
    names1 = {n for n, p in model.named_parameters() if p in set(model.trainable_parameters(1))}
    assert not any("lora_" in n or n.startswith("bridge.") for n in names1)

    out_dir = model.save_pretrained(tmp_path / "ckpt")
    assert (out_dir / "lora" / "adapter_model.safetensors").is_file()
    loaded = JointModel.from_pretrained(out_dir)
    assert loaded.lora_enabled
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).lm_logits, model.eval()(ids).lm_logits, atol=1e-6, rtol=0)

    # The adapter alone on a plain base (reader without the joint retrieval) = joint with pathway/bridge off.
    plain, _ = load_llm(str(tiny_llm_dirs["llama"]))
    reader = load_lora_reader(plain, out_dir)
    with torch.no_grad():
        torch.testing.assert_close(reader(input_ids=ids).logits, loaded(ids, pathway=False, bridge=False).lm_logits,
                                   atol=1e-5, rtol=0)
    other, _ = load_llm(str(tiny_llm_dirs["llama4"]))
    with pytest.raises(FingerprintMismatchError):
        load_lora_reader(other, out_dir)

    (out_dir / "lora" / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(UniragError):
        JointModel.from_pretrained(out_dir)
    with pytest.raises(UniragError):
        loaded.enable_lora()


def test_lora_on_top_layers_only(tiny_llm_dirs, tmp_path):
    model = make_joint(tiny_llm_dirs["llama"], pathway_layers=1, save_dtype="float32")
    with pytest.raises(UniragError):
        model.enable_lora(r=4, alpha=8, layers=[3])  # the tiny model has layers 0-2
    model.enable_lora(r=4, alpha=8, layers=[2])
    wrapped = _lora_module_names(model)
    assert len(wrapped) == 7 and all(".layers.2." in n for n in wrapped)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    model.trainable_parameters(2)
    assert not model.extra_embed.weight.requires_grad  # frozen: no gradient has to reach the bottom
    ids = sample_ids(model)
    model.train()
    model(ids, pathway=True, bridge=True).lm_logits.sum().backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    model.eval()
    out_dir = model.save_pretrained(tmp_path / "ckpt")
    loaded = JointModel.from_pretrained(out_dir)
    assert _lora_module_names(loaded) == wrapped
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).lm_logits, model(ids).lm_logits, atol=1e-6, rtol=0)


def test_retrieval_mode_switches_the_adapter_off(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"], pathway_layers=2)
    ids = sample_ids(model)
    with torch.no_grad():
        before = model(ids).docid_logits
        with model.retrieval_mode():  # no LoRA yet: a no-op
            torch.testing.assert_close(model(ids).docid_logits, before)
    model.enable_lora(r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        adapted = model(ids).docid_logits
        assert (adapted - before).abs().max() > 1e-3
        model.config.adapter_in_retrieval = True
        with model.retrieval_mode():
            torch.testing.assert_close(model(ids).docid_logits, adapted)
        model.config.adapter_in_retrieval = False
        with model.retrieval_mode():
            torch.testing.assert_close(model(ids).docid_logits, before, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids).docid_logits, adapted)  # back on after the context


def test_adapter_disabled_fast_switch_equals_peft(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"], pathway_layers=2)
    model.enable_lora(r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    ids = sample_ids(model)
    with torch.no_grad():
        adapted = model(ids).lm_logits
        with model.base.disable_adapter():
            reference = model(ids).lm_logits
        with model.adapter_disabled():  # no gradients: the fast switch
            torch.testing.assert_close(model(ids).lm_logits, reference, atol=0, rtol=0)
            with model.adapter_disabled():  # nested: still off, and the outer context stays off after it
                torch.testing.assert_close(model(ids).lm_logits, reference, atol=0, rtol=0)
            torch.testing.assert_close(model(ids).lm_logits, reference, atol=0, rtol=0)
        torch.testing.assert_close(model(ids).lm_logits, adapted, atol=0, rtol=0)
        with pytest.raises(RuntimeError), model.adapter_disabled():
            raise RuntimeError("boom")
        torch.testing.assert_close(model(ids).lm_logits, adapted, atol=0, rtol=0)  # back on after an error
    # With gradients (training) peft's own context runs: the adapter is off and trainable again afterwards.
    with model.adapter_disabled():
        torch.testing.assert_close(model(ids).lm_logits.detach(), reference, atol=0, rtol=0)
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)
    torch.testing.assert_close(model(ids).lm_logits.detach(), adapted, atol=0, rtol=0)


def test_lora_refuses_joint_targets(tiny_llm_dirs):
    model = make_joint(tiny_llm_dirs["llama"])
    with pytest.raises(UniragError):
        model.enable_lora(target_modules=("q_proj", "r_q_proj"))


# ------------------------------------------------------------------------------------------- real model (slow)


@pytest.mark.slow
def test_real_smollm2_exact_float32():
    base, tok = load_llm(None, dtype=torch.float32)
    ids = torch.tensor([tok("Q: who wrote the declaration of independence?\n")["input_ids"]])
    with torch.no_grad():
        expected = base(ids).logits  # before wrapping (one copy of the model in memory)
    model = JointModel(base, JointConfig(docid_levels=4, docid_branching=16), tokenizer=tok).eval()
    assert model.num_retrieval_heads == 6 and model.pathway_layer_ids == [26, 27, 28, 29]
    with torch.no_grad():
        fresh = model(ids, pathway=True, bridge=True).lm_logits
        randomise(model, std=0.02)
        off = model(ids, pathway=False, bridge=False).lm_logits
    torch.testing.assert_close(fresh, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(off, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_smollm2_4bit_lora_forward():
    pytest.importorskip("bitsandbytes")
    base, tok = load_llm(None, precision="nf4")
    question = torch.tensor([tok("Q: what is the capital of France?\n")["input_ids"]])
    with torch.no_grad():
        expected = base(question).logits
    model = JointModel(base, JointConfig(docid_levels=2, docid_branching=8), tokenizer=tok)
    with torch.no_grad():  # the wrapped 4-bit attention is still the 4-bit base
        torch.testing.assert_close(model(question, pathway=False, bridge=False).lm_logits, expected, atol=1e-5, rtol=0)
    model.enable_lora(r=4, alpha=8)
    assert _lora_module_names(model) and not _lora_module_names(model.pathways)
    ids = torch.cat([question, torch.tensor([[model.retrieve_token_id]])], dim=1)
    model.trainable_parameters(2)
    out = model(ids, pathway=True, bridge=True)
    assert torch.isfinite(out.lm_logits).all() and out.docid_logits.shape == (1, ids.shape[1], 17)
    out.docid_logits[0, -1].logsumexp(-1).backward()  # gradients reach LoRA through the 4-bit layers
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_narrow_bridge_decodes_incrementally_and_round_trips(tiny_llm_dirs, tmp_path):
    """bridge_dim < hidden: 4 x hidden x bridge_dim projections; cached decoding and a reload stay exact."""
    wide, narrow = make_joint(tiny_llm_dirs["llama"]), make_joint(tiny_llm_dirs["llama"], bridge_dim=16)
    hidden = wide.base_config.hidden_size

    def count(model):
        return sum(p.numel() for n, p in model.joint_named_parameters() if n.startswith("bridge."))

    assert count(wide) - count(narrow) == 4 * hidden * (hidden - 16)
    assert narrow.bridge.head_dim == 16 // 4
    randomise(narrow)
    full = assert_incremental_equals_full(narrow)
    ids = docid_sequence(narrow, narrow.tokenizer)
    narrow.config.save_dtype = "float32"
    loaded = JointModel.from_pretrained(narrow.save_pretrained(tmp_path / "ckpt", tree=FakeTree()))
    assert loaded.config.bridge_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).lm_logits, full.lm_logits, atol=0, rtol=0)
    with pytest.raises(UniragError, match="bridge width 18"):
        make_joint(tiny_llm_dirs["llama"], bridge_dim=18)  # 4 heads do not divide 18
    with pytest.raises(UniragError, match="bridge_dim"):
        JointConfig(docid_levels=2, docid_branching=2, bridge_dim=-1)
