"""Megatron's evaluations as functions with explicit inputs (DESIGN: a function, a CLI verb, a recipe).

* `megahf.tasks.lambada`: LAMBADA zero-shot accuracy (`load_texts`, `featurize`, `score`, `evaluate`), as
  Megatron-LM's tasks/zeroshot_gpt computes it, strict or not.
* `megahf.tasks.wikitext`: WikiText-103 zero-shot perplexity (`load_text`, `detokenize`, `featurize`, `windows`,
  `score`, `evaluate`), the sliding window and the adjusted perplexity as Megatron computes them.
* `megahf.tasks.common`: what both share (`EvaluationError`, model and tokenizer loading, right-padded batches).
* `megahf.tasks.finetuning`: the fine-tuning tasks (GLUE's nine, RACE) as `FinetuneTask`s (`TASKS`, `get_task`):
  loading and checking their data (`task_data`), Megatron's featurization (`glue`, `race`), batches, metrics (the
  evaluate modules of `megahf.metrics`) and prediction files. Below all of them, `task_spec` says what a task is
  (`TaskSpec`) and holds their error, `TaskDataError`; the imports run one way: race imports task_spec and glue,
  task_data imports race, finetuning imports them all.
* `megahf.tasks.distributed`: the same under torchrun / accelerate launch (`--tensor-parallel-size` ranks per
  replica, the examples split over the replicas, the results reduced in example order).
* `megahf.tasks.run`: `megahf evaluate lambada|wikitext` (checks everything, then computes, prints a table, writes
  `--output-json`).

Importing this package is cheap; its modules import torch when they are imported.
"""

TASKS = ("lambada", "wikitext")

__all__ = ["TASKS"]
