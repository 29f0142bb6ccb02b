"""transformers' common model tests (ModelTesterMixin, TrainingTesterMixin, TensorParallelTesterMixin) on megahf's
BERT, every head: MegatronBertModel, ForPreTraining, ForMaskedLM, ForSequenceClassification, ForMultipleChoice,
ForQuestionAnswering, ForTokenClassification.

The tester follows transformers' own (tests/models/megatron_bert/test_modeling_megatron_bert.py): hidden 32,
2 layers, vocab 99, batch 13, sequence 7, 16 token types, 3 labels, 4 choices. megahf's class names are those of
transformers' in-tree MegatronBert, so the common tests already find them in transformers' auto-mapping name tables
(multiple-choice inputs, labels for each head). BERT cannot `generate`, so there is no GenerationTesterMixin.
Every skip below carries its reason.
"""

from __future__ import annotations

import unittest

import torch

from _hf_common import MegatronTensorParallelRules, load

from megahf.models.bert import (
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
)

_common = load("test_modeling_common")
ModelTesterMixin = _common.ModelTesterMixin
ids_tensor = _common.ids_tensor
random_attention_mask = _common.random_attention_mask
TrainingTesterMixin = load("test_training_mixin").TrainingTesterMixin
TensorParallelTesterMixin = load("test_tensor_parallel_mixin").TensorParallelTesterMixin
ConfigTester = load("test_configuration_common").ConfigTester


class MegatronBertModelTester:
    base_model_class = MegatronBertModel

    def __init__(self, parent, batch_size=13, seq_length=7, is_training=True, use_input_mask=True,
                 use_token_type_ids=True, use_labels=True, vocab_size=99, hidden_size=32, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=64, max_position_embeddings=512, type_vocab_size=16,
                 type_sequence_label_size=2, num_labels=3, num_choices=4):
        self.parent = parent
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_token_type_ids = use_token_type_ids
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        # transformers' testers use 37; Megatron's tensor parallelism needs a width that divides by the TP size (2)
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.type_sequence_label_size = type_sequence_label_size
        self.num_labels = num_labels
        self.num_choices = num_choices

    def get_config(self) -> MegatronBertConfig:
        return MegatronBertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            ffn_hidden_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            num_labels=self.num_labels,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_type_ids = (ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size)
                          if self.use_token_type_ids else None)
        sequence_labels = token_labels = choice_labels = None
        if self.use_labels:
            sequence_labels = ids_tensor([self.batch_size], self.type_sequence_label_size)
            token_labels = ids_tensor([self.batch_size, self.seq_length], self.num_labels)
            choice_labels = ids_tensor([self.batch_size], self.num_choices)
        config = self.get_config()
        return config, input_ids, token_type_ids, input_mask, sequence_labels, token_labels, choice_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, token_type_ids, input_mask, *_ = self.prepare_config_and_inputs()
        inputs_dict = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": input_mask}
        return config, inputs_dict

    # create_and_check_* as in transformers' megatron_bert tester: one forward pass per head, output shapes checked
    def create_and_check_model(self, config, input_ids, token_type_ids, input_mask, *_):
        model = MegatronBertModel(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids)
            result = model(input_ids, token_type_ids=token_type_ids)
            result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(result.pooler_output.shape, (self.batch_size, self.hidden_size))

    def create_and_check_for_masked_lm(self, config, input_ids, token_type_ids, input_mask, sequence_labels,
                                       token_labels, choice_labels):
        model = MegatronBertForMaskedLM(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        # the loss is the cross entropy of the logits the model returns
        expected = torch.nn.functional.cross_entropy(result.logits.reshape(-1, self.vocab_size),
                                                     token_labels.reshape(-1))
        torch.testing.assert_close(result.loss, expected, msg=lambda m: "loss != cross entropy of the returned "
                                   f"logits (over config.vocab_size={self.vocab_size}):\n{m}")

    def create_and_check_for_pretraining(self, config, input_ids, token_type_ids, input_mask, sequence_labels,
                                         token_labels, choice_labels):
        model = MegatronBertForPreTraining(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=token_labels,
                           next_sentence_label=sequence_labels)
        self.parent.assertEqual(result.prediction_logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertEqual(result.seq_relationship_logits.shape, (self.batch_size, 2))
        # the loss is masked LM + sentence order, each the cross entropy of the logits the model returns
        expected = (torch.nn.functional.cross_entropy(result.prediction_logits.reshape(-1, self.vocab_size),
                                                      token_labels.reshape(-1))
                    + torch.nn.functional.cross_entropy(result.seq_relationship_logits, sequence_labels))
        torch.testing.assert_close(result.loss, expected, msg=lambda m: "loss != cross entropy of the returned "
                                   f"logits (over config.vocab_size={self.vocab_size}):\n{m}")

    def create_and_check_for_question_answering(self, config, input_ids, token_type_ids, input_mask,
                                                sequence_labels, token_labels, choice_labels):
        model = MegatronBertForQuestionAnswering(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids,
                           start_positions=sequence_labels, end_positions=sequence_labels)
        self.parent.assertEqual(result.start_logits.shape, (self.batch_size, self.seq_length))
        self.parent.assertEqual(result.end_logits.shape, (self.batch_size, self.seq_length))

    def create_and_check_for_sequence_classification(self, config, input_ids, token_type_ids, input_mask,
                                                     sequence_labels, token_labels, choice_labels):
        model = MegatronBertForSequenceClassification(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=sequence_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_labels))

    def create_and_check_for_token_classification(self, config, input_ids, token_type_ids, input_mask,
                                                  sequence_labels, token_labels, choice_labels):
        model = MegatronBertForTokenClassification(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.num_labels))

    def create_and_check_for_multiple_choice(self, config, input_ids, token_type_ids, input_mask, sequence_labels,
                                             token_labels, choice_labels):
        model = MegatronBertForMultipleChoice(config).eval()

        def expand(t):
            return t.unsqueeze(1).expand(-1, self.num_choices, -1).contiguous()

        with torch.no_grad():
            result = model(expand(input_ids), attention_mask=expand(input_mask),
                           token_type_ids=expand(token_type_ids), labels=choice_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.num_choices))


class MegatronBertModelTest(MegatronTensorParallelRules, ModelTesterMixin, TrainingTesterMixin, TensorParallelTesterMixin,
                             unittest.TestCase):
    all_model_classes = (
        MegatronBertModel,
        MegatronBertForMaskedLM,
        MegatronBertForMultipleChoice,
        MegatronBertForPreTraining,
        MegatronBertForQuestionAnswering,
        MegatronBertForSequenceClassification,
        MegatronBertForTokenClassification,
    )
    # test_can_init_all_missing_weights runs only for models whose config file carries a copyright year >= 2023
    # (older in-tree models are exempt for now); megahf's files carry none, which reads as "old": hold it to the rule.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = MegatronBertModelTester(self)
        self.config_tester = ConfigTester(self, config_class=MegatronBertConfig, hidden_size=64,
                                          num_attention_heads=4)

    # as in transformers' megatron_bert test: the pretraining head takes MLM labels and a sentence-order label
    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if return_labels and model_class is MegatronBertForPreTraining:
            inputs_dict["labels"] = torch.zeros(
                (self.model_tester.batch_size, self.model_tester.seq_length), dtype=torch.long)
            inputs_dict["next_sentence_label"] = torch.zeros(self.model_tester.batch_size, dtype=torch.long)
        return inputs_dict

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_masked_lm(self):
        self.model_tester.create_and_check_for_masked_lm(*self.model_tester.prepare_config_and_inputs())

    def test_for_pretraining(self):
        self.model_tester.create_and_check_for_pretraining(*self.model_tester.prepare_config_and_inputs())

    def test_for_question_answering(self):
        self.model_tester.create_and_check_for_question_answering(*self.model_tester.prepare_config_and_inputs())

    def test_for_sequence_classification(self):
        self.model_tester.create_and_check_for_sequence_classification(
            *self.model_tester.prepare_config_and_inputs())

    def test_for_token_classification(self):
        self.model_tester.create_and_check_for_token_classification(*self.model_tester.prepare_config_and_inputs())

    def test_for_multiple_choice(self):
        self.model_tester.create_and_check_for_multiple_choice(*self.model_tester.prepare_config_and_inputs())

    # TrainingTesterMixin overfits a causal LM (or a sequence classifier) on a batch whose labels are the input ids;
    # BERT's head with one label per token is the masked LM (every position labelled: it learns to copy).
    def _get_trainable_model_class(self):
        return MegatronBertForMaskedLM

    # TensorParallelTesterMixin runs its distributed tests on the tester's causal LM through `.logits`; BERT's
    # vocabulary-parallel head is the masked LM, which has the same output.
    def _get_tp_model_class(self):
        return MegatronBertForMaskedLM

    @unittest.skip(reason="BERT is an encoder: it has no generate() to run under tensor parallelism")
    def test_tp_generation(self):
        pass

    @unittest.skip(reason="BERT is an encoder: it has no generate() to run under tensor parallelism")
    def test_tp_generation_quantized(self):
        pass
