from .configuration_megatron_gpt import MegatronGPTConfig
from .modeling_megatron_gpt import MegatronGPTForCausalLM, MegatronGPTModel, MegatronGPTPreTrainedModel

__all__ = ["MegatronGPTConfig", "MegatronGPTForCausalLM", "MegatronGPTModel", "MegatronGPTPreTrainedModel"]
