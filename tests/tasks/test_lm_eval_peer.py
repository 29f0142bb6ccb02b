"""The peer users would pick instead, lm-evaluation-harness (`lm_eval`), runs a megahf model through its
transformers backend (HFLM), offline, and its `lambada_openai` accuracy equals megahf's strict LAMBADA accuracy on the
same model and passages, passage by passage.

Offline, lm-eval's own task definition is used with only its data source swapped: its `lambada_openai.yaml` is read
from the installed package (the same `doc_to_text`, `doc_to_target`, `output_type: loglikelihood`, metrics) and
`dataset_path: EleutherAI/lambada_openai` becomes `dataset_path: json` on megahf's fixture jsonl (the same passages
as the fixture folder laid out like the Hub dataset).

When the two split a passage alike: lm-eval's context is `text.split(' ')[:-1]` joined by spaces and its target
`' ' + text.split(' ')[-1]`; its causal backend tokenizes context + target WHOLE and cuts at the context's length.
megahf (Megatron's strict mode) takes the last `str.split()` word, strips the context, and tokenizes context and
`' ' + word` APART. GPT-2's pre-tokenizer makes `' word'` a piece of its own after a non-space character, so both give
the same tokens whenever the passage's last whitespace is one single space (every passage of the fixture). They part when the last whitespace is a newline or a tab (lm-eval's target then
holds several words), or several spaces (lm-eval moves the extra spaces into its target): see the second test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from required import oracle
from task_helpers import FIXTURES, fitted_gpt
from megahf.tasks import lambada

lm_eval = oracle("lm_eval")
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager, get_task_dict  # noqa: E402

TASK = "lambada_openai_local"
DATA = FIXTURES / "lambada_openai.jsonl"


def local_lambada_openai() -> dict:
    """lm-eval's shipped `lambada_openai` task with its data read from the local fixture instead of the Hub."""
    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "lambada" / "lambada_openai.yaml").read_text())
    assert config["task"] == "lambada_openai" and config["output_type"] == "loglikelihood"
    config.pop("tag", None)  # the group `lambada` would pull in the Hub tasks
    config.update(task=TASK, dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {"test": str(DATA)}})
    return config


@pytest.fixture(scope="module")
def model(gpt2):
    return fitted_gpt(lambada.load_texts(DATA), gpt2)


@pytest.fixture(scope="module")
def harness(model, gpt2):
    return HFLM(pretrained=model, tokenizer=gpt2, backend="causal", batch_size=4)


def test_megahf_strict_accuracy_equals_lm_eval_lambada_openai_acc(model, gpt2, harness):
    texts = lambada.load_texts(DATA)
    flags = lambada.correct_flags(model, lambada.featurize(texts, gpt2, strict=True), micro_batch_size=3)
    assert 0 < sum(flags) < len(flags)  # the fitted model gets some right and some wrong: the comparison can fail

    results = lm_eval.simple_evaluate(model=harness, tasks=[local_lambada_openai()], log_samples=True,
                                      bootstrap_iters=0, task_manager=TaskManager(include_defaults=False))
    samples = sorted(results["samples"][TASK], key=lambda sample: sample["doc_id"])
    assert [sample["doc"]["text"] for sample in samples] == texts
    # lm-eval's acc of a loglikelihood request is "the greedy tokens are the target's", megahf's all-labels-right
    assert [bool(sample["acc"]) for sample in samples] == flags
    assert results["results"][TASK]["acc,none"] == sum(flags) / len(flags)


def test_tokenizations_agree_on_single_spaces_and_part_on_other_whitespace(gpt2, harness):
    task = get_task_dict([local_lambada_openai()], TaskManager(include_defaults=False))[TASK]
    fixture = [{"text": text} for text in lambada.load_texts(DATA)]
    parting = [{"text": "The keeper climbed the stairs. He said:\nAnna"},  # the last whitespace is a newline
               {"text": "The keeper climbed the stairs to see  Anna"}]    # two spaces before the last word
    for doc in fixture + parting:
        context_ids, target_ids = harness._encode_pair(task.doc_to_text(doc), task.doc_to_target(doc))
        [example] = lambada.featurize([doc["text"]], gpt2, strict=True)
        agree = (context_ids + target_ids == example.tokens and len(target_ids) == example.num_labels)
        assert agree == (doc in fixture), doc["text"]
    # what lm-eval scores there: the words after the last single space, or the extra space with the word
    newline, spaces = (harness._encode_pair(task.doc_to_text(d), task.doc_to_target(d))[1] for d in parting)
    assert gpt2.decode(newline) == " said:\nAnna" and gpt2.decode(spaces) == "  Anna"
