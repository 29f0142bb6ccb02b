"""transformers' common model tests, run against megahf's models (see README.md in this folder)."""

# shims/ holds the modules the sdist's tests import but the sdist lacks; they are not test files.
collect_ignore = ["shims"]

# markers that transformers' test decorators put on its common tests (registered in transformers' own conftest)
_MARKERS = ("is_training_test", "is_tensor_parallel_test", "is_expert_parallel_test", "is_fsdp_test",
            "torch_compile_test", "torch_export_test", "flash_attn_test", "flash_attn_3_test", "flash_attn_4_test",
            "is_staging_test", "is_pipeline_test", "generate", "bitsandbytes", "not_device_test", "slow",
            "accelerate_tests")


def pytest_configure(config):
    for marker in _MARKERS:
        config.addinivalue_line("markers", f"{marker}: a transformers common-test marker")
