"""What a transformers user may rely on, for MegatronGPT (both shapes) and every MegatronBert head: tuples with
`return_dict=False`, the `past_key_values` name, resizing the (padded) vocabulary and loading it back, a vocabulary
that does not match its checkpoint, and modeling files that need nothing of megahf outside `models/`.

transformers' own common model tests (tests/models/) cover the rest of the contract.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache

import megahf
from megahf import MegatronBertConfig, MegatronGPTConfig, MegatronGPTForCausalLM

MODELS_DIR = Path(megahf.__file__).parent / "models"
VOCAB = 99  # padded to 128 rows
BERT_HEADS = ("MegatronBertModel", "MegatronBertForPreTraining", "MegatronBertForMaskedLM",
              "MegatronBertForSequenceClassification", "MegatronBertForMultipleChoice",
              "MegatronBertForQuestionAnswering", "MegatronBertForTokenClassification")


def gpt(variant: str, seed: int = 0, **overrides) -> MegatronGPTForCausalLM:
    torch.manual_seed(seed)
    preset = "gpt-tiny" if variant == "gpt" else "llama-tiny"
    shape = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, hidden_dropout=0.0,
                 attention_dropout=0.0)
    if variant == "llama":
        shape.update(num_query_groups=2, ffn_hidden_size=64, tie_word_embeddings=False)
    return MegatronGPTForCausalLM(MegatronGPTConfig.from_preset(preset, **{**shape, **overrides})).eval()


def bert(class_name: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config = MegatronBertConfig.from_preset("bert-tiny", vocab_size=VOCAB, hidden_size=32, num_layers=2,
                                            num_attention_heads=4, hidden_dropout=0.0, attention_dropout=0.0,
                                            num_labels=3, **overrides)
    return getattr(megahf, class_name)(config).eval()


def ids(batch: int = 2, seq: int = 7, high: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, high, (batch, seq), generator=torch.Generator().manual_seed(seed))


def bert_inputs(class_name: str) -> dict:
    inputs = {"input_ids": ids(), "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    if class_name == "MegatronBertForMultipleChoice":
        inputs = {k: v[:, None].repeat(1, 3, 1) for k, v in inputs.items()}
    return inputs


# --------------------------------------------------------------------------------------------------------------------
# return_dict=False, past_key_values


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_gpt_return_dict_false_gives_the_output_as_a_tuple(variant):
    model = gpt(variant)
    labels = ids()
    out = model(ids(), labels=labels)
    as_tuple = model(ids(), labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss)
    torch.testing.assert_close(as_tuple[1], out.logits)
    base = model.model(ids(), return_dict=False)
    assert isinstance(base, tuple)
    torch.testing.assert_close(base[0], model.model(ids()).last_hidden_state)


@pytest.mark.parametrize("class_name", BERT_HEADS)
def test_bert_return_dict_false_gives_the_output_as_a_tuple(class_name):
    model = bert(class_name)
    out = model(**bert_inputs(class_name))
    as_tuple = model(**bert_inputs(class_name), return_dict=False)
    assert isinstance(as_tuple, tuple)
    expected = out.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple, expected):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_past_key_values_is_accepted_and_used(variant):
    model = gpt(variant)
    sequence = ids(seq=9)
    prefix = model(sequence[:, :6], use_cache=True)
    # The pre-transformers-5 name: used (not swallowed by **kwargs), with a deprecation warning.
    step = model(sequence[:, 6:], past_key_values=prefix.cache, use_cache=True)
    full = model(sequence).logits
    torch.testing.assert_close(step.logits, full[:, 6:], rtol=1e-5, atol=1e-5)
    assert step.cache.get_seq_length() == 9


def _deprecated_cache_name_warnings(model) -> list[str]:
    """Call `model` with the old `past_key_values` name inside a fresh `catch_warnings(record=True)`, as transformers'
    `test_bc_cache_name_forward` does; the deprecation messages it recorded."""
    with warnings.catch_warnings(record=True) as caught:
        model(ids(), past_key_values=DynamicCache(config=model.config), use_cache=True)
    return [str(w.message) for w in caught if "`past_key_values` is deprecated" in str(w.message)]


def test_past_key_values_warns_on_every_call_in_any_order():
    """Issue 22: the deprecation warning must reach every caller that records warnings, whatever ran before it in the
    process: both GPT shapes and both classes in turn, each called first outside any `catch_warnings` (so the
    warning registry of the calling location already holds the message, as after an earlier test), then twice
    inside fresh ones. transformers' Llama, whose warning the common test is written for, runs the same sequence."""
    peer = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=4, num_key_value_heads=2)
    models = [(f"{variant}/{type(m).__name__}", m) for variant in ("gpt", "llama")
              for m in (gpt(variant).model.eval(), gpt(variant))]
    models += [("transformers Llama", transformers.LlamaForCausalLM(peer).eval())]
    for name, model in models:
        model(ids(), past_key_values=DynamicCache(config=model.config), use_cache=True)  # warns once, uncaught
        for call in (1, 2):
            assert len(_deprecated_cache_name_warnings(model)) == 1, f"{name}: no deprecation warning on call {call}"


# --------------------------------------------------------------------------------------------------------------------
# The loss is the cross entropy of the returned logits


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_gpt_loss_equals_cross_entropy_of_the_returned_logits(variant):
    model = gpt(variant)
    inputs, labels = ids(), ids(seed=2)
    out = model(inputs, labels=labels)
    assert out.logits.shape == (2, 7, VOCAB)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)


@pytest.mark.parametrize("class_name", ["MegatronBertForMaskedLM", "MegatronBertForPreTraining"])
def test_bert_masked_lm_loss_equals_cross_entropy_of_the_returned_logits(class_name):
    model = bert(class_name)
    labels = ids(seed=2).masked_fill(ids(seed=3) % 3 != 0, -100)
    out = model(**bert_inputs(class_name), labels=labels)
    logits = out.logits if class_name == "MegatronBertForMaskedLM" else out.prediction_logits
    assert logits.shape == (2, 7, VOCAB)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.flatten(0, 1), labels.flatten()))


# --------------------------------------------------------------------------------------------------------------------
# Resizing the vocabulary


@pytest.mark.parametrize("variant", ["gpt", "llama"])
@pytest.mark.parametrize("new_vocab", [109, 150, 40])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 128])
def test_resize_rows_vocab_and_round_trip(variant, new_vocab, pad_to_multiple_of, tmp_path):
    """transformers' rule (n rows), or Megatron's padding with `pad_to_multiple_of` (n tokens, rows rounded up);
    either way the config describes the matrix, so that save and reload agree."""
    model = gpt(variant)
    old_rows = model.get_input_embeddings().weight.detach().clone()
    model.resize_token_embeddings(new_vocab, pad_to_multiple_of=pad_to_multiple_of)
    config = model.config
    rows = new_vocab if pad_to_multiple_of is None else -(-new_vocab // 128) * 128
    assert (config.vocab_size, config.padded_vocab_size) == (new_vocab, rows)
    assert model.get_input_embeddings().weight.shape[0] == rows
    assert model.get_output_embeddings().weight.shape[0] == rows
    kept = min(VOCAB, new_vocab)
    torch.testing.assert_close(model.get_input_embeddings().weight[:kept], old_rows[:kept], rtol=0, atol=0)
    out = model(ids(high=new_vocab))
    assert out.logits.shape[-1] == new_vocab

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (reloaded.config.vocab_size, reloaded.config.padded_vocab_size) == (new_vocab, rows)
    torch.testing.assert_close(reloaded(ids(high=new_vocab)).logits, out.logits, rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_resize_initialises_new_rows_around_the_mean_of_the_real_rows(variant):
    # Rows 99..127 existed as padding; once they stand for tokens they are initialised as transformers initialises
    # new rows (mean-resizing): around the mean of the OLD REAL rows, not kept as Megatron-initialised padding.
    model = gpt(variant)
    with torch.no_grad():
        model.get_input_embeddings().weight[:VOCAB] += 5.0  # real rows far from the padded ones
    real_mean = model.get_input_embeddings().weight[:VOCAB].mean(0)
    model.resize_token_embeddings(400, pad_to_multiple_of=128)
    new_rows = model.get_input_embeddings().weight[VOCAB:400]
    # Each new row is drawn around the old mean with the old rows' covariance (spread ~0.02 per coordinate):
    # the mean of 301 such rows lies within a few 0.02 / sqrt(301) ~ 1e-3 of it, far from the padded rows' ~0.
    assert (new_rows.mean(0) - real_mean).abs().max() < 0.02
    if not model.config.tie_word_embeddings:
        out_rows = model.get_output_embeddings().weight
        assert out_rows.shape[0] == 512


@pytest.mark.parametrize("class_name", ["MegatronBertForMaskedLM", "MegatronBertForPreTraining",
                                        "MegatronBertForSequenceClassification"])
def test_bert_resize_to_fewer_tokens_round_trips(class_name, tmp_path):
    model = bert(class_name)
    model.resize_token_embeddings(109 if class_name.endswith("Classification") else 40, pad_to_multiple_of=128)
    assert model.config.padded_vocab_size == model.get_input_embeddings().weight.shape[0] == 128
    inputs = bert_inputs(class_name)
    expected = model(**inputs)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    for got, want in zip(reloaded(**inputs).to_tuple(), expected.to_tuple()):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_from_pretrained_with_another_vocab_size_is_refused(tmp_path):
    gpt("gpt").save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match=r"vocab_size=10 does not match the checkpoint's vocab_size=99 .*"
                                         r"resize_token_embeddings\(10\)"):
        MegatronGPTForCausalLM.from_pretrained(tmp_path, vocab_size=10)
    assert MegatronGPTForCausalLM.from_pretrained(tmp_path, vocab_size=VOCAB).config.vocab_size == VOCAB
    # As transformers does on a size mismatch: ignore_mismatched_sizes=True initialises the embeddings anew.
    stored = MegatronGPTForCausalLM.from_pretrained(tmp_path).get_input_embeddings().weight
    fresh = MegatronGPTForCausalLM.from_pretrained(tmp_path, vocab_size=10, ignore_mismatched_sizes=True)
    assert fresh.config.vocab_size == 10 and fresh(ids(high=10)).logits.shape[-1] == 10
    assert not torch.equal(fresh.get_input_embeddings().weight, stored)


# --------------------------------------------------------------------------------------------------------------------
# Modeling files are self-contained (Hub remote code)


def test_modeling_files_import_nothing_of_megahf_outside_models():
    for path in sorted(MODELS_DIR.rglob("*.py")):
        tree = ast.parse(path.read_text())
        depth = len(path.relative_to(MODELS_DIR).parts) - 1  # 0 for models/x.py, 1 for models/gpt/x.py
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level <= depth + 1, f"{path.name} imports from outside models/: {ast.unparse(node)}"
            if isinstance(node, ast.ImportFrom) and not node.level:
                assert not (node.module or "").startswith("megahf"), f"{path.name}: {ast.unparse(node)}"
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("megahf") for a in node.names), f"{path.name}: {ast.unparse(node)}"


@pytest.mark.parametrize("variant", ["gpt", "llama"])
def test_shift_labels_may_be_a_slice_of_the_sample(variant):
    # Megatron's datasets give seq + 1 tokens per sample: inputs = tokens[:, :-1], shift_labels = tokens[:, 1:],
    # a non-contiguous view.
    model = gpt(variant)
    tokens = ids(seq=9)
    out = model(tokens[:, :-1], shift_labels=tokens[:, 1:])
    expected = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected)
