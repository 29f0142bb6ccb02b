"""megahf's stand-in for transformers' tests/utils/test_configuration_utils.py, which the sdist does not ship: only
`config_common_kwargs`, the one name tests/test_configuration_common.py imports from it.

It holds a non-default value for each argument that transformers 5.24's base `PreTrainedConfig` declares (its
instance `__dict__`, less `is_encoder_decoder` and the private fields), plus `output_attentions`;
`ConfigTester.check_config_arguments_init` builds the model's config with all of them and checks that each is kept.
"""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
