"""megahf: Megatron-LM's models, parallelism and recipes as citizens of the Hugging Face ecosystem.

Importing megahf registers its configs and models with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .models.gpt import MegatronGPTConfig, MegatronGPTForCausalLM, MegatronGPTModel

__version__ = "0.1.0"

AutoConfig.register(MegatronGPTConfig.model_type, MegatronGPTConfig, exist_ok=True)
AutoModel.register(MegatronGPTConfig, MegatronGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MegatronGPTConfig, MegatronGPTForCausalLM, exist_ok=True)

__all__ = ["MegatronGPTConfig", "MegatronGPTForCausalLM", "MegatronGPTModel", "__version__"]
