"""Continued pretraining from a checkpoint (`model:` a folder), in one process: the loaded model is the folder's model
(logits equal transformers' own, every weight equal to the folder's), each converted tensor reads in blocks exactly
what the whole tensor holds there, and what continued pretraining cannot do is refused before anything is computed,
the key named: another architecture, a longer sequence than a learned position table, a checkpoint format that must
be converted first, a model without a language-model head, and a tokenizer other than the checkpoint's or the data's.
The layouts (TP, TP x FSDP2) are tests/distributed/test_continue_layouts.py's."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import transformers

from continue_helpers import FOLDERS, RUN_KEYS, bert_folder, make_folder, reference_logits
from megahf.convert.detect import read_model_folder
from megahf.convert.tensor_parts import whole
from megahf.data.preprocess import preprocess_corpus
from megahf.recipe import RecipeError
from megahf.training import load_recipe
from megahf.training.setup import build_config, build_model, load_tokenizer
from test_pretrain import write_corpus


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: make_folder(kind, root) for kind in FOLDERS}


def continue_recipe(kind: str, folder, tmp_path, **keys):
    values = {"model": folder, "tokenizer": folder, "output_dir": tmp_path / "out", "seq_length": 32,
              "warmup_steps": 1, **RUN_KEYS[kind], **keys}
    return load_recipe(None, [token for key, value in values.items() for token in (f"--{key}", str(value))])


def prediction_logits(output) -> torch.Tensor:
    return output.logits if getattr(output, "logits", None) is not None else output.prediction_logits


# The Llama in the default tier; the other folders go through the same loader (extended tier; at TP=2 they are
# tests/distributed/test_continue_layouts.py's)
@pytest.mark.parametrize("kind", [kind if kind == "llama" else pytest.param(kind, marks=pytest.mark.extended)
                                  for kind in FOLDERS])
def test_the_loaded_model_is_the_folders_model(kind, folders, tmp_path):
    """The model a run starts from: logits equal to the folder's own model run by transformers (megahf's class for
    the megahf folder) on 48 positions, and every parameter equal, bit for bit, to the folder's tensor as `megahf
    convert` reads it. The logits differ only by the order of float32 reductions (fused vs separate QKV, the
    attention kernels): about 1e-7 of their magnitude; a wrong layout or a missed tensor is off by the order of the
    logits themselves, hence 1e-5 relative to the largest logit. The Llama is Llama 3.x-shaped (grouped-query
    attention, Llama 3's RoPE scaling) and the 48 positions run past its original context of 16."""
    recipe = continue_recipe(kind, folders[kind], tmp_path)
    tokenizer = load_tokenizer(recipe)
    model = build_model(recipe, tokenizer).eval()
    loaded = read_model_folder(folders[kind])
    params = dict(model.named_parameters())
    assert params.keys() == loaded.tensors.keys()
    assert [name for name, ref in loaded.items() if not torch.equal(params[name], ref.load().float())] == []
    ids = torch.randint(0, len(tokenizer), (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = prediction_logits(model(input_ids=ids, attention_mask=torch.ones_like(ids)))[..., :len(tokenizer)]
    theirs = reference_logits(folders[kind], ids)[..., :len(tokenizer)]
    scale = theirs.abs().max().item()
    assert scale > 1.0  # logits of order one: the comparison below means something
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_every_converted_tensor_reads_in_blocks_what_the_whole_tensor_holds(kind, folders):
    """What a tensor-parallel / FSDP2 rank reads of a converted checkpoint (GPT-2's transposed, regrouped QKV, Llama's
    q, k, v fused by query group, BERT's per-head QKV, vocabularies padded with zero rows) is the block of what
    `megahf convert` writes there, bit for bit; random blocks, empty ones included."""
    rng = random.Random(0)
    for name, ref in read_model_folder(folders[kind]).items():
        full = ref.load()
        assert torch.equal(ref.read(whole(ref.shape)), full), name
        for _ in range(4):
            block = []
            for size in ref.shape:
                start = rng.randrange(size + 1)
                block.append(slice(start, rng.randrange(start, size + 1)))
            assert torch.equal(ref.read(tuple(block)), full[tuple(block)]), (name, block)


def test_a_rope_checkpoint_takes_a_longer_context(folders, tmp_path):
    """A context extension of a RoPE model: max_position_embeddings, RoPE's scaling and base are model_overrides it
    takes (the rest of the architecture is the checkpoint's), and dropout may be switched on."""
    recipe = continue_recipe("llama", folders["llama"], tmp_path, seq_length=1024,
                             **{"model_overrides.max_position_embeddings": 1024,
                                "model_overrides.rotary_base": 1000000, "model_overrides.hidden_dropout": 0.1})
    config = build_config(recipe.model)
    assert (config.max_position_embeddings, config.rotary_base, config.hidden_dropout) == (1024, 1000000, 0.1)
    assert config.rope_parameters["rope_type"] == "llama3"  # the checkpoint's scaling kept with the new base
    assert config.hidden_size == 64 and config.num_query_groups == 2


SCALINGS = {"linear": {"rope_type": "linear", "factor": 4.0},
            "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}}


@pytest.mark.parametrize("scaling", ["yarn", pytest.param("linear", marks=pytest.mark.extended)])
def test_a_context_extension_equals_transformers_beyond_the_original_context(scaling, folders, tmp_path):
    """The Llama folder (256 positions) continued at 1024 with another RoPE scaling given as model_overrides: the
    loaded model's logits over 640 positions equal transformers' LlamaForCausalLM with the same rope_parameters (1e-5
    of the largest logit, as above), and beyond position 256 they are not the folder's model's (the new scaling is in
    force). YaRN in the default tier, linear in the extended."""
    rope = SCALINGS[scaling]
    recipe = continue_recipe("llama", folders["llama"], tmp_path, seq_length=1024,
                             **{"model_overrides.max_position_embeddings": 1024,
                                "model_overrides.rope_parameters": json.dumps(rope)})
    tokenizer = load_tokenizer(recipe)
    model = build_model(recipe, tokenizer).eval()
    assert model.config.rope_parameters == {**rope, "rope_theta": 500000.0}  # the checkpoint's base kept
    ids = torch.randint(0, len(tokenizer), (1, 640), generator=torch.Generator().manual_seed(0))
    hf = transformers.LlamaForCausalLM.from_pretrained(folders["llama"], max_position_embeddings=1024,
                                                       rope_parameters={**rope, "rope_theta": 500000.0}).eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., :len(tokenizer)]
        theirs = hf(input_ids=ids).logits[..., :len(tokenizer)]
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-5 * scale
    before = reference_logits(folders["llama"], ids)[..., :len(tokenizer)]
    assert (ours[:, 256:] - before[:, 256:]).abs().max().item() > 1e-2 * scale


REFUSED = {  # (kind, recipe keys) -> the message
    "another architecture": ("llama", {"model_overrides.hidden_size": 128},
                             r"model_overrides.hidden_size=128 would change the architecture of the checkpoint.*"
                             r"remove it .*hidden_dropout"),
    "a longer sequence than GPT-2's positions": ("gpt2", {"seq_length": 128},
                                                 r"seq_length=128 exceeds the 64 positions model=.* learned .*set "
                                                 r"seq_length to at most 64, or continue a RoPE model"),
    "a larger GPT-2 position table": ("gpt2", {"model_overrides.max_position_embeddings": 128},
                                      r"model_overrides.max_position_embeddings=128 cannot apply .*its 64 positions "
                                      r"are a learned table"),
    "a longer sequence than BERT's positions": ("bert", {"seq_length": 256},
                                                r"seq_length=256 exceeds the 128 positions"),
    "the chunked loss as a model field": ("llama", {"model_overrides.loss_chunk_size": 8},
                                          r"model_overrides.loss_chunk_size=8: .* recipe key loss_chunk_size"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_what_continued_pretraining_cannot_change_is_refused(case, folders, tmp_path):
    kind, keys, message = REFUSED[case]
    with pytest.raises(RecipeError, match=message):
        continue_recipe(kind, folders[kind], tmp_path, **keys)


def test_checkpoints_that_are_not_model_folders_are_refused_with_the_fix(folders, tmp_path):
    """Megatron-LM, torch_dist and nanotron checkpoints (and megahf's own training checkpoints) are converted first:
    the error gives the command; a model megahf does not read, and a BERT without its masked-LM head, are refused."""
    megatron = tmp_path / "megatron"
    (megatron / "iter_0000100" / "mp_rank_00").mkdir(parents=True)
    (megatron / "latest_checkpointed_iteration.txt").write_text("100")
    dist = tmp_path / "dist"
    (dist / "iter_0000100").mkdir(parents=True)
    (dist / "latest_checkpointed_iteration.txt").write_text("100")
    (dist / "iter_0000100" / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    nanotron = tmp_path / "nanotron"
    (nanotron / "model").mkdir(parents=True)
    (nanotron / "model_config.json").write_text("{}")
    step = tmp_path / "step_0000010"
    step.mkdir()
    (step / "megahf_checkpoint.json").write_text("{}")
    for folder, command in ((megatron, "--from megatron --to megahf"), (dist, "--from megatron-dist --to megahf"),
                            (nanotron, "--from nanotron --to megahf"), (step, "--from megahf --to megahf")):
        with pytest.raises(RecipeError, match=rf"model='{re.escape(str(folder))}' is a .*convert it first \(megahf "
                                              rf"convert {command} {re.escape(str(folder))}"):
            continue_recipe("llama", folder, tmp_path)
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(RecipeError, match=r"model_type='mistral' is not a model megahf reads"):
        continue_recipe("llama", mistral, tmp_path)
    classifier = bert_folder(tmp_path / "classifier", head=transformers.BertForSequenceClassification)
    with pytest.raises(RecipeError, match=r"is a MegatronBertForSequenceClassification: pretraining continues a "
                                          r"causal LM .* or a BERT with its masked-LM head"):
        continue_recipe("bert", classifier, tmp_path)
    with pytest.raises(RecipeError, match=r"unknown model preset model='no/such/thing'"):
        continue_recipe("llama", "no/such/thing", tmp_path)


def _tiny_tokenizer(folder, size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(size - 1)} | {"</s>": size - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0", eos_token="</s>").save_pretrained(
        folder)
    return folder


def test_a_tokenizer_other_than_the_checkpoints_is_refused(folders, tmp_path):
    """The Llama folder holds GPT-2's tokenizer: another one smaller than its vocabulary (so that its ids would all
    fit) is refused, as is a tokenizer larger than the vocabulary (GPT-2's for the BERT); the same tokenizer from
    elsewhere (the shipped GPT-2 BPE) passes."""
    load_tokenizer(continue_recipe("llama", folders["llama"], tmp_path, tokenizer="gpt2-embedded"))
    smaller = continue_recipe("llama", folders["llama"], tmp_path, tokenizer=_tiny_tokenizer(tmp_path / "tiny", 1000))
    with pytest.raises(RecipeError, match=r"tokenizer=.* is .*1,000 tokens.*, not the tokenizer saved with model=.*"
                                          r"50,257 tokens.*set tokenizer: "):
        load_tokenizer(smaller)
    larger = continue_recipe("bert", folders["bert"], tmp_path, tokenizer=folders["llama"])
    with pytest.raises(RecipeError, match=r"has 50,257 tokens but model=.* has a vocabulary of 30,522: its ids would "
                                          r"index past the embeddings"):
        load_tokenizer(larger)


def test_data_made_with_another_tokenizer_is_refused_before_any_compute(tmp_path, capsys):
    """Indexed data records the tokenizer that made it; a run whose tokenizer is another is refused even when that
    one is no larger than the data's (the ids would all fit, and the model would learn from the wrong text). Data
    without a record (an older megahf, Megatron's own tool) is warned about, not refused."""
    corpus = write_corpus(tmp_path / "corpus.jsonl", n_docs=20)
    prefix = preprocess_corpus(str(corpus), str(tmp_path / "data" / "shk"), tokenizer="gpt2", append_eod=True,
                               progress=False).prefixes["text"]
    keys = {"data_path": prefix, "output_dir": tmp_path / "out", "warmup_steps": 1}
    args = [token for key, value in keys.items() for token in (f"--{key}", str(value))]
    load_tokenizer(load_recipe(None, args))  # the data's own tokenizer
    other = load_recipe(None, args + ["--tokenizer", str(_tiny_tokenizer(tmp_path / "tiny", 1000))])
    with pytest.raises(RecipeError, match=rf"data_path='{re.escape(prefix)}': .* was tokenized with 'gpt2' \(50,257 "
                                          r"tokens.*, but the run's tokenizer is .*1,000 tokens.*set tokenizer: gpt2"):
        load_tokenizer(other)
    (tmp_path / "data" / "shk_text_document.tokenizer_identity.json").unlink()  # data of an older megahf
    capsys.readouterr()
    load_tokenizer(other)
    assert "has no tokenizer record" in capsys.readouterr().out


def test_a_bert_folder_holding_more_heads_than_its_class_continues_as_its_class(tmp_path):
    """bert-base-uncased's BertForMaskedLM file also holds the pooler and the next-sentence head of the pretraining it
    came from; as transformers' from_pretrained does, the class decides: masked LM only, the rest left out (noted)."""
    folder = bert_folder(tmp_path / "bert", head=transformers.BertForPreTraining)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    loaded = read_model_folder(folder)
    assert loaded.model_class == "MegatronBertForMaskedLM"
    assert not any(name.startswith(("model.pooler.", "binary_head.")) for name in loaded.tensors)
    assert any("model.pooler" in note and "binary_head" in note for note in loaded.notes), loaded.notes
    recipe = continue_recipe("bert", folder, tmp_path)
    assert build_config(recipe.model).add_binary_head is False  # no sentence-order loss: masked LM only
