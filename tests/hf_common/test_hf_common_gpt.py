"""transformers' common model tests (ModelTesterMixin, GenerationTesterMixin, TrainingTesterMixin,
TensorParallelTesterMixin) on megahf's GPT, in both of its shapes: GPT-2 style (`gpt-tiny`: learned positions,
LayerNorm, GELU, biases, tied output) and Llama style (`llama-tiny`: RoPE, RMSNorm, SwiGLU, GQA, untied output).

The testers follow transformers' own (tests/models/llama/test_modeling_llama.py): tiny configs with hidden 32,
2 layers, vocab 99, batch 13, sequence 7. Every skip below carries its reason.
"""

from __future__ import annotations

import unittest

import torch

from _hf_common import InTreeNames, MegatronTensorParallelRules, load

from megahf.models.gpt import MegatronGPTConfig, MegatronGPTForCausalLM, MegatronGPTModel

_common = load("test_modeling_common")
ModelTesterMixin = _common.ModelTesterMixin
ids_tensor = _common.ids_tensor
random_attention_mask = _common.random_attention_mask
GenerationTesterMixin = load("generation.test_utils").GenerationTesterMixin
TrainingTesterMixin = load("test_training_mixin").TrainingTesterMixin
TensorParallelTesterMixin = load("test_tensor_parallel_mixin").TensorParallelTesterMixin
ConfigTester = load("test_configuration_common").ConfigTester


class MegatronGPTModelTester:
    base_model_class = MegatronGPTModel
    causal_lm_class = MegatronGPTForCausalLM

    def __init__(self, parent, preset="gpt-tiny", batch_size=13, seq_length=7, is_training=True,
                 use_input_mask=True, vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=None, intermediate_size=None, max_position_embeddings=512, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2):
        self.parent = parent
        self.preset = preset
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        # transformers' testers use 37; Megatron's tensor parallelism needs a width that divides by the TP size (2)
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def get_config(self) -> MegatronGPTConfig:
        return MegatronGPTConfig.from_preset(
            self.preset,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_key_value_heads,
            ffn_hidden_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            pad_token_id=self.pad_token_id,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        return self.get_config(), input_ids, input_mask, token_labels

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, input_mask, _ = self.prepare_config_and_inputs()
        inputs_dict = {"input_ids": input_ids}
        if input_mask is not None:
            inputs_dict["attention_mask"] = input_mask
        return config, inputs_dict

    def create_and_check_model(self, config, input_ids, input_mask, token_labels):
        model = self.base_model_class(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask)
            result = model(input_ids)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def create_and_check_causal_lm(self, config, input_ids, input_mask, token_labels):
        model = self.causal_lm_class(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertEqual(result.loss.shape, ())
        # the loss is the cross entropy of the logits the model returns (labels shifted inside, as in transformers)
        expected = torch.nn.functional.cross_entropy(result.logits[:, :-1].reshape(-1, self.vocab_size),
                                                     token_labels[:, 1:].reshape(-1))
        torch.testing.assert_close(result.loss, expected, msg=lambda m: "loss != cross entropy of the returned "
                                   f"logits (over config.vocab_size={self.vocab_size}):\n{m}")


class _MegatronGPTCommonTest(InTreeNames, MegatronTensorParallelRules, ModelTesterMixin, GenerationTesterMixin,
                             TrainingTesterMixin, TensorParallelTesterMixin):
    all_model_classes = (MegatronGPTModel, MegatronGPTForCausalLM)
    auto_mapping_names = {
        "MODEL_MAPPING_NAMES": {"megatron_gpt": "MegatronGPTModel"},
        "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES": {"megatron_gpt": "MegatronGPTForCausalLM"},
    }
    # test_can_init_all_missing_weights runs only for models whose config file carries a copyright year >= 2023
    # (older in-tree models are exempt for now); megahf's files carry none, which reads as "old": hold it to the rule.
    test_can_init_all_missing_weights_before_2023 = True
    preset: str
    tester_kwargs: dict = {}

    def setUp(self):
        self.model_tester = MegatronGPTModelTester(self, preset=self.preset, **self.tester_kwargs)
        self.config_tester = ConfigTester(self, config_class=MegatronGPTConfig, hidden_size=64,
                                          num_attention_heads=4)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_causal_lm(self):
        self.model_tester.create_and_check_causal_lm(*self.model_tester.prepare_config_and_inputs())


class MegatronGPT2StyleModelTest(_MegatronGPTCommonTest, unittest.TestCase):
    """GPT-2 style: learned absolute positions, LayerNorm, GELU MLP, biases, tied output layer."""

    preset = "gpt-tiny"

    def setUp(self):
        super().setUp()
        # transformers runs its RoPE tests for every config with a `rope_parameters` attribute; on learned positions
        # it is None and refused (tests/test_configuration_gpt.py), the Llama-style class runs them
        if self._testMethodName.startswith("test_model_rope_"):
            self.skipTest("GPT-2 style: learned positions, no RoPE to scale or rotate partially")


class MegatronGPTLlamaStyleModelTest(_MegatronGPTCommonTest, unittest.TestCase):
    """Llama style: RoPE, RMSNorm, SwiGLU, grouped-query attention (4 heads, 2 groups), untied output layer."""

    preset = "llama-tiny"
    tester_kwargs = {"num_key_value_heads": 2, "intermediate_size": 64}


del _MegatronGPTCommonTest
