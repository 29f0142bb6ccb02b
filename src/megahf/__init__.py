"""megahf: Megatron-LM's models, parallelism and recipes as citizens of the Hugging Face ecosystem.

Importing megahf registers its configs and models with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from .models.bert import (
    MegatronBertConfig,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
)
from .models.gpt import MegatronGPTConfig, MegatronGPTForCausalLM, MegatronGPTModel
from . import parallel  # noqa: F401  (attaches megahf's distribution hooks to the model classes)

__version__ = "0.1.0"

AutoConfig.register(MegatronGPTConfig.model_type, MegatronGPTConfig, exist_ok=True)
AutoModel.register(MegatronGPTConfig, MegatronGPTModel, exist_ok=True)
AutoModelForCausalLM.register(MegatronGPTConfig, MegatronGPTForCausalLM, exist_ok=True)

AutoConfig.register(MegatronBertConfig.model_type, MegatronBertConfig, exist_ok=True)
for auto_class, model_class in (
    (AutoModel, MegatronBertModel),
    (AutoModelForPreTraining, MegatronBertForPreTraining),
    (AutoModelForMaskedLM, MegatronBertForMaskedLM),
    (AutoModelForSequenceClassification, MegatronBertForSequenceClassification),
    (AutoModelForMultipleChoice, MegatronBertForMultipleChoice),
    (AutoModelForQuestionAnswering, MegatronBertForQuestionAnswering),
    (AutoModelForTokenClassification, MegatronBertForTokenClassification),
):
    auto_class.register(MegatronBertConfig, model_class, exist_ok=True)

__all__ = [
    "MegatronBertConfig",
    "MegatronBertForMaskedLM",
    "MegatronBertForMultipleChoice",
    "MegatronBertForPreTraining",
    "MegatronBertForQuestionAnswering",
    "MegatronBertForSequenceClassification",
    "MegatronBertForTokenClassification",
    "MegatronBertModel",
    "MegatronGPTConfig",
    "MegatronGPTForCausalLM",
    "MegatronGPTModel",
    "__version__",
]
