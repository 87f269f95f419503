"""Parameter groups on real (tiny, built from configs) transformers models, against hand-computed counts
and transformers' own Trainer.get_decay_parameter_names."""
from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

import optim_plugins as op
from optim_plugins.param_groups import layer_depths, no_decay_names

tf = pytest.importorskip("transformers")

H, I, V, P = 32, 37, 100, 64  # hidden, intermediate, vocab, positions of every tiny model
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@functools.cache
def build(kind: str) -> nn.Module:
    """One tiny model per family, shared by the tests (they must not change it)."""
    torch.manual_seed(0)
    if kind == "bert":
        return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=I, max_position_embeddings=P))
    if kind == "roberta":
        return tf.RobertaForMaskedLM(tf.RobertaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=I, max_position_embeddings=P, **TOKENS))
    if kind == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=2, n_positions=P, **TOKENS))
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=I, **TOKENS))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=I, **TOKENS))
    if kind == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=I, num_layers=2, num_decoder_layers=2, num_heads=2, **TOKENS))
    if kind == "whisper":
        return tf.WhisperForConditionalGeneration(tf.WhisperConfig(
            vocab_size=V, d_model=H, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=I, decoder_ffn_dim=I, num_mel_bins=8, max_source_positions=16, max_target_positions=16,
            decoder_start_token_id=1, **TOKENS))
    if kind == "wav2vec2":
        return tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(
            vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=I,
            conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2, **TOKENS))
    raise KeyError(kind)


KINDS = ["bert", "roberta", "gpt2", "llama", "qwen2", "t5", "whisper", "wav2vec2"]


def by_name(groups):
    return {g["name"]: g for g in groups}


def counts(groups):
    """{group name: (#tensors, #params)}"""
    return {g["name"]: (len(g["params"]), sum(p.numel() for p in g["params"])) for g in groups}


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- no-decay rule


@pytest.mark.parametrize("kind", KINDS)
def test_no_decay_agrees_with_transformers_trainer(kind):
    model = build(kind)
    hf_decay = set(tf.Trainer.get_decay_parameter_names(None, model))  # the method does not use self
    hf_no_decay = {n for n, _ in model.named_parameters()} - hf_decay
    ours = no_decay_names(model)
    assert hf_no_decay <= ours
    # Where we differ, it is our extra rule "0/1-dim tensors get no decay": wav2vec2's mask embedding vector.
    expected_extra = {"wav2vec2.masked_spec_embed"} if kind == "wav2vec2" else set()
    assert ours - hf_no_decay == expected_extra
    assert all(dict(model.named_parameters())[n].ndim <= 1 for n in expected_extra)


def test_norm_found_by_type_not_name():
    class MyRMSNorm(nn.Module):  # a family's own RMSNorm, under a name with no "norm" in it
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, 4))  # 2-dim on purpose: only the type can tell

    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4, 4))
    model.add_module("post", MyRMSNorm())
    model.add_module("bn", nn.BatchNorm1d(4))
    model.add_module("gn", nn.GroupNorm(2, 4))
    model.add_module("emb", nn.Embedding(10, 4))
    assert no_decay_names(model) == {"proj.bias", "post.scale", "bn.weight", "bn.bias", "gn.weight", "gn.bias"}
    assert no_decay_names(model, decay_embeddings=False) == no_decay_names(model) | {"emb.weight"}


def test_two_groups_by_default_and_every_tensor_once():
    model = build("bert")
    groups = op.param_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    # hand count: embeddings 100*32 + 64*32 + 2*32, per layer 4*32*32 + 2*32*37, pooler 32*32, classifier 2*32
    decay = V * H + P * H + 2 * H + 2 * (4 * H * H + 2 * H * I) + H * H + 2 * H
    # biases and LayerNorms: embeddings LN, per layer 4 attention biases + 2 LNs + 2 FFN biases, pooler, classifier
    no_decay = 2 * H + 2 * (4 * H + 2 * 2 * H + I + H) + H + 2
    assert counts(groups) == {"decay": (3 + 2 * 6 + 2, decay), "no_decay": (2 + 2 * 10 + 2, no_decay)}
    assert not any("param_names" in g or "lr" in g for g in groups)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layer_decay", [None, 0.8])
def test_every_trainable_tensor_in_exactly_one_group(kind, layer_decay):
    model = build(kind)
    groups = op.param_groups(model, weight_decay=0.05, lr=1e-3, layer_decay=layer_decay)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in trainable(model)}
    assert len({g["name"] for g in groups}) == len(groups)
    torch.optim.AdamW(groups, lr=1e-3)  # torch accepts them as they are


def test_tied_weights_counted_once_and_frozen_left_out():
    model = build("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight
    groups = op.param_groups(model, weight_decay=0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    whisper = build("whisper")  # Whisper freezes its sinusoidal encoder positions
    frozen = whisper.model.encoder.embed_positions.weight
    assert not frozen.requires_grad
    groups = op.param_groups(whisper, weight_decay=0.1)
    assert all(p is not frozen for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(trainable(whisper)) == len(list(whisper.parameters())) - 1


def test_decay_embeddings_false():
    groups = by_name(op.param_groups(build("llama"), weight_decay=0.1, decay_embeddings=False))
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    llama = build("llama")
    assert id(llama.model.embed_tokens.weight) in no_decay
    assert id(llama.lm_head.weight) not in no_decay  # untied head: a Linear, decayed


def test_no_decay_extra_patterns_and_function():
    model = build("llama")
    groups = by_name(op.param_groups(model, weight_decay=0.1, no_decay=[r"lm_head"]))
    assert any(p is model.lm_head.weight for p in groups["no_decay"]["params"])
    only_2d = by_name(op.param_groups(model, weight_decay=0.1, no_decay=lambda name, p: "mlp" in name))
    assert len(only_2d["no_decay"]["params"]) == 2 * 3  # gate, up, down of 2 layers: the rule is replaced


def test_weight_decay_defaults_to_the_optimizer_default():
    model = build("bert")
    assert by_name(op.param_groups(model, optimizer="adamw"))["decay"]["weight_decay"] == 0.01
    assert by_name(op.param_groups(model, optimizer="adam"))["decay"]["weight_decay"] == 0.0
    assert "weight_decay" not in by_name(op.param_groups(model))["decay"]  # no optimizer named: its default applies


# ----------------------------------------------------------------------------- layer-wise lr decay


def test_layer_decay_bert_hand_computed():
    groups = op.param_groups(build("bert"), lr=1.0, weight_decay=0.1, layer_decay=0.5)
    # L = 2 blocks: embeddings 0.5**3, block i 0.5**(2 - i), pooler + classifier the full lr
    assert {g["name"]: g["lr"] for g in groups} == {
        "embeddings/decay": 0.125, "embeddings/no_decay": 0.125,
        "layer_0/decay": 0.25, "layer_0/no_decay": 0.25,
        "layer_1/decay": 0.5, "layer_1/no_decay": 0.5,
        "head/decay": 1.0, "head/no_decay": 1.0,
    }
    assert all(g["lr_scale"] == g["lr"] for g in groups)  # lr = 1.0
    assert counts(groups) == {
        "embeddings/decay": (3, V * H + P * H + 2 * H), "embeddings/no_decay": (2, 2 * H),
        "layer_0/decay": (6, 4 * H * H + 2 * H * I), "layer_0/no_decay": (10, 4 * H + 4 * H + I + H),
        "layer_1/decay": (6, 4 * H * H + 2 * H * I), "layer_1/no_decay": (10, 4 * H + 4 * H + I + H),
        "head/decay": (2, H * H + 2 * H), "head/no_decay": (2, H + 2),
    }


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_layer_decay_llama_family_hand_computed(kind):
    groups = op.param_groups(build(kind), lr=2e-3, weight_decay=0.1, layer_decay=0.8)
    kv = H // 2  # one key/value head of size 16
    per_layer = 2 * H * H + 2 * H * kv + 3 * H * I  # q, o; k, v; gate, up, down
    bias = H + 2 * kv if kind == "qwen2" else 0  # Qwen2 has q/k/v biases
    expected = {
        "embeddings/decay": (1, V * H, 0.8**3),
        "layer_0/decay": (7, per_layer, 0.8**2),
        "layer_0/no_decay": (2 + (3 if bias else 0), 2 * H + bias, 0.8**2),
        "layer_1/decay": (7, per_layer, 0.8),
        "layer_1/no_decay": (2 + (3 if bias else 0), 2 * H + bias, 0.8),
        "head/no_decay": (1, H, 1.0),  # final RMSNorm
        "head/decay": (1, V * H, 1.0),  # untied lm_head
    }
    got = {g["name"]: (len(g["params"]), sum(p.numel() for p in g["params"]), g["lr"] / 2e-3) for g in groups}
    assert got.keys() == expected.keys()
    for name, (n, numel, scale) in expected.items():
        assert got[name][:2] == (n, numel), name
        assert got[name][2] == pytest.approx(scale), name


def _lr_of(groups):
    return {id(p): g["lr"] for g in groups for p in g["params"]}


@pytest.mark.parametrize("kind", KINDS)
def test_layer_decay_monotone_in_depth(kind):
    model = build(kind)
    lr_of = _lr_of(op.param_groups(model, lr=1.0, layer_decay=0.7))
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    depths, top = layer_depths([n for n, _ in named])
    num_blocks = top - 1
    assert num_blocks == (4 if kind in ("t5", "whisper") else 2)  # encoder-decoders: both stacks
    # inside the blocks, the lr strictly grows with the block's depth
    block_lr = {}
    for name, p in named:
        if 1 <= depths[name] <= num_blocks and re.search(r"\.(layer|layers|h|block)\.\d+\.", name):
            block_lr.setdefault(depths[name], set()).add(lr_of[id(p)])
    assert all(len(v) == 1 for v in block_lr.values())
    ordered = [block_lr[d].pop() for d in sorted(block_lr)]
    assert ordered == sorted(ordered) and len(set(ordered)) == num_blocks
    assert ordered == pytest.approx([0.7 ** (num_blocks - i) for i in range(num_blocks)])
    lrs = set(lr_of.values())
    assert min(lrs) == pytest.approx(0.7 ** (num_blocks + 1))  # embeddings: the deepest decay
    assert max(lrs) == 1.0  # heads: the full lr


def test_layer_decay_encoder_decoder_depths():
    whisper = build("whisper")
    lr_of = _lr_of(op.param_groups(whisper, lr=1.0, layer_decay=0.5))
    enc, dec = whisper.model.encoder, whisper.model.decoder
    # L = 4 (2 encoder + 2 decoder blocks): embeddings 0.5**5, encoder 0.5**4, 0.5**3, decoder 0.5**2, 0.5
    assert lr_of[id(enc.conv1.weight)] == 0.5**5  # the audio stem counts as embeddings
    assert lr_of[id(dec.embed_tokens.weight)] == 0.5**5  # so do the decoder's token embeddings
    assert lr_of[id(enc.layers[0].fc1.weight)] == 0.5**4
    assert lr_of[id(enc.layer_norm.weight)] == 0.5**3  # the encoder's final norm: with its last block
    assert lr_of[id(dec.layers[0].fc1.weight)] == 0.5**2
    assert lr_of[id(dec.layers[1].fc1.weight)] == 0.5
    assert lr_of[id(dec.layer_norm.weight)] == 1.0
    t5 = build("t5")
    lr_of = _lr_of(op.param_groups(t5, lr=1.0, layer_decay=0.5))
    assert lr_of[id(t5.shared.weight)] == 0.5**5
    assert lr_of[id(t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight)] == 0.5**4
    assert lr_of[id(t5.encoder.block[1].layer[1].DenseReluDense.wo.weight)] == 0.5**3
    assert lr_of[id(t5.encoder.final_layer_norm.weight)] == 0.5**3
    assert lr_of[id(t5.decoder.block[1].layer[2].DenseReluDense.wo.weight)] == 0.5
    assert lr_of[id(t5.decoder.final_layer_norm.weight)] == 1.0
    assert t5.lm_head.weight is t5.shared.weight  # T5 ties its head to the shared embeddings: depth 0


def test_layer_decay_wav2vec2_and_tied_gpt2():
    w2v = build("wav2vec2")
    lr_of = _lr_of(op.param_groups(w2v, lr=1.0, layer_decay=0.5))
    assert lr_of[id(w2v.wav2vec2.feature_extractor.conv_layers[1].conv.weight)] == 0.5**3  # conv stem, not a stack
    assert lr_of[id(w2v.wav2vec2.encoder.layers[0].feed_forward.output_dense.weight)] == 0.5**2
    assert lr_of[id(w2v.lm_head.weight)] == 1.0
    gpt2 = build("gpt2")
    lr_of = _lr_of(op.param_groups(gpt2, lr=1.0, layer_decay=0.5))
    assert lr_of[id(gpt2.lm_head.weight)] == 0.5**3  # tied to wte: one tensor, the embeddings' lr
    assert lr_of[id(gpt2.transformer.ln_f.weight)] == 1.0


def test_layer_decay_generic_fallback_and_user_function():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    lr_of = _lr_of(op.param_groups(model, lr=1.0, layer_decay=0.5))
    # numbered children 0, 2, 4 are depths 1..3 of N = 4
    assert [lr_of[id(m.weight)] for m in (model[0], model[2], model[4])] == [0.125, 0.25, 0.5]
    groups = op.param_groups(model, lr=1.0, layer_decay=0.5, layer_id=lambda name: 0 if name.startswith("0.") else 1)
    assert {g["name"]: g["lr"] for g in groups} == {"depth_0/decay": 0.5, "depth_0/no_decay": 0.5, "depth_1/decay": 1.0, "depth_1/no_decay": 1.0}


def test_layer_decay_needs_lr_and_a_valid_factor():
    with pytest.raises(ValueError, match="layer_decay needs lr="):
        op.param_groups(build("bert"), layer_decay=0.8)
    with pytest.raises(ValueError, match=r"layer_decay must be in \(0, 1\], got 1.5"):
        op.param_groups(build("bert"), lr=1e-3, layer_decay=1.5)


# ----------------------------------------------------------------------------- overrides


def test_overrides_applied_in_order():
    model = build("bert")
    groups = op.param_groups(
        model, lr=1.0, weight_decay=0.1, layer_decay=0.5,
        overrides=[
            (r"^classifier\.", {"lr": 3.0, "name": "cls"}),
            (r"attention\.self\.query", {"lr_scale": 0.1}),
            (r"^classifier\.bias", {"weight_decay": 0.2}),  # a later rule wins on its key only
        ],
    )
    lr_of, groups_of = _lr_of(groups), {id(p): g for g in groups for p in g["params"]}
    layer0 = model.bert.encoder.layer[0].attention.self
    assert lr_of[id(layer0.query.weight)] == pytest.approx(0.25 * 0.1)
    assert groups_of[id(layer0.query.weight)]["name"] == r"layer_0/decay/attention\.self\.query"
    assert lr_of[id(layer0.key.weight)] == 0.25  # matches nothing: keeps the defaults
    assert groups_of[id(layer0.key.weight)]["name"] == "layer_0/decay"
    cls_w, cls_b = groups_of[id(model.classifier.weight)], groups_of[id(model.classifier.bias)]
    assert (cls_w["name"], cls_w["lr"], cls_w["lr_scale"], cls_w["weight_decay"]) == ("head/decay/cls", 3.0, 3.0, 0.1)
    assert (cls_b["lr"], cls_b["weight_decay"]) == (3.0, 0.2)


def test_override_optimizer_options_checked_and_typed():
    model = build("llama")
    groups = by_name(op.param_groups(model, optimizer="sgd", overrides=[("lm_head", {"momentum": "0.9", "nesterov": "true"})]))
    head = groups["decay/lm_head"]
    assert head["momentum"] == 0.9 and head["nesterov"] is True
    with pytest.raises(ValueError, match=r"overrides\[0\] \('lm_head'\): optimizer 'adam' has no option 'momentum'"):
        op.param_groups(model, optimizer="adam", overrides=[("lm_head", {"momentum": 0.9})])
    with pytest.raises(ValueError, match="option 'momentum' can only be checked against an optimizer"):
        op.param_groups(model, overrides=[("lm_head", {"momentum": 0.9})])
    with pytest.raises(ValueError, match="'betas'"):
        op.param_groups(model, optimizer="adam", overrides=[("lm_head", {"betas": "(0.9,)"})])
    with pytest.raises(ValueError, match="lr_scale override needs lr="):
        op.param_groups(model, overrides=[("lm_head", {"lr_scale": 2})])
    with pytest.raises(ValueError, match=r"overrides\[0\]: bad regex '\('"):
        op.param_groups(model, overrides=[("(", {"lr": 1.0})])


def test_override_that_matches_nothing_warns():
    with pytest.warns(UserWarning, match="'decoder_only' matches no trainable parameter"):
        op.param_groups(build("bert"), lr=1.0, overrides=[("decoder_only", {"lr": 2.0})])


def test_groups_drive_a_real_optimizer_step():
    model = build("bert")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        groups = op.param_groups(model, lr=1e-2, layer_decay=0.5, optimizer="adamw", overrides=[("classifier", {"lr": 0.0})])
        opt = op.create_optimizer("adamw", groups, lr=1e-2)
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in groups]
        ids = torch.randint(3, V, (2, 8))
        model(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
        opt.step()
        assert torch.equal(model.classifier.weight, state["classifier.weight"])  # lr 0: untouched
        assert not torch.equal(model.bert.pooler.dense.weight, state["bert.pooler.dense.weight"])
    finally:
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- describe


def test_describe_param_groups_table(capsys):
    groups = op.param_groups(build("bert"), lr=1.0, weight_decay=0.1, layer_decay=0.5)
    op.describe_param_groups(groups)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["group", "#tensors", "#params", "lr", "weight", "decay"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:] if not line.startswith("-")}
    assert rows["layer_0/no_decay"] == ["10", "325", "0.25", "0"]
    assert rows["embeddings/decay"] == ["3", "5,312", "0.125", "0.1"]
    total = sum(p.numel() for p in trainable(build("bert")))
    assert rows["total"] == [str(len(trainable(build("bert")))), f"{total:,}"]
    opt = torch.optim.SGD(op.param_groups(build("bert")), lr=0.5)
    assert "0.5" in op.format_param_groups(opt)  # an optimizer's groups: its defaults filled in
