"""`megahf finetune`: fine-tune a pretrained Megatron BERT on a GLUE task or RACE, as Megatron-LM's tasks/ did.

    result = run_finetune(load_finetune_recipe("recipes/glue/mnli.yaml", ["--model", "runs/bert-336m/final"]))

The pretrained encoder is loaded into `MegatronBertForSequenceClassification` (GLUE; STS-B as regression) or
`MegatronBertForMultipleChoice` (RACE): its pretraining heads are dropped and the task head is newly initialised.
Training is `MegatronTrainer` (Megatron's decay groups and linear decay, clipping across meshes) under every layout of
pretraining for a full fine-tuning; `peft: lora` trains LoRA adapters on `lora_target_modules` with the task head
trained fully (peft's `modules_to_save`), `peft: qlora` the same on a 4-bit nf4 base (bitsandbytes);
`optim: adamw_bnb_8bit` keeps AdamW's state in 8 bits (bitsandbytes). The dev split(s) are scored every
`eval_interval` steps and at the end with the task's metrics; every rank scores the whole split in the same batches
(exact under every layout: tensor-parallel and FSDP ranks must run their forwards together anyway), and the test
splits are predicted into the GLUE submission files.

What `output_dir` holds:
    final/            the model and tokenizer (`AutoModelFor{SequenceClassification,MultipleChoice}.from_pretrained`
                      after `import megahf`); with LoRA/QLoRA the peft adapter (`adapter_config.json` names the base
                      model; `PeftModel.from_pretrained(base, final)`), the task head inside it, and the tokenizer
    results.json      the schema below
    results.md        the same figures as a markdown table
    predictions/      one file per test split (`task.prediction_file_name`: CoLA.tsv, MNLI-m.tsv, race_test.tsv...)
    loss.png          train loss per logged step, dev loss per evaluation
    recipe.yaml       the recipe as run (train_steps and warmup_steps resolved)

results.json (read by the model card's model-index; keep these names):
    {
      "task": "mnli",                        # megahf task name
      "dataset": "nyu-mll/glue",             # the Hub dataset the task is defined on
      "dataset_config": "mnli",              # its config
      "dataset_path": null,                  # the local folder the data came from (null: the Hub)
      "smoke": false,                        # true: the shipped fixture, NOT the real data: never report these
      "split": "validation_matched",         # the main dev split
      "main_metric": "accuracy",
      "metrics": {"accuracy": 0.84},         # metric name -> value on the main dev split
      "eval_splits": ["validation_matched", "validation_mismatched"],
      "validation_matched": {"accuracy": 0.84},      # one mapping per dev split, metric name -> value
      "validation_mismatched": {"accuracy": 0.85},
      "dev_loss": {"validation_matched": 0.45, "validation_mismatched": 0.43},   # the training loss on each
      "predictions": {"test_matched": "predictions/MNLI-m.tsv", ...},   # relative to output_dir
      "model": "runs/bert-336m/final",       # the recipe's model (folder, Hub id or preset)
      "peft": "none", "optim": "adamw", "steps": 30680, "epochs": 10, "train_rows": 392702,
      "global_batch_size": 128, "learning_rate": 1e-05, "max_seq_length": 128, "seed": 1234, "layout": "..."
    }
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from torch.nn import functional as F
from torch.utils.data import DataLoader
from transformers import (AutoConfig, AutoModelForMultipleChoice, AutoModelForSequenceClassification, AutoTokenizer,
                          TrainerCallback, set_seed)
from transformers.trainer_callback import ProgressCallback
from transformers.utils import logging as hf_logging

from ..assets import embedded_tokenizer_path
from ..atomic import atomic_write_json, atomic_write_text
from ..models.bert import MegatronBertConfig, MegatronBertForMultipleChoice, MegatronBertForSequenceClassification
from ..parallel import distribute_model
from ..parallel.layout import ParallelLayout
from ..parallel.ranks import barrier, is_rank_zero
from ..recipe import FinetuneRecipe, RecipeError, parse_recipe, save_recipe
from ..recipe.data import EMBEDDED_BERT_TOKENIZER
from ..recipe.finetune import BERT_PRESETS
from ..tasks.finetuning import FinetuneTask, fixture_path, get_task
from .callbacks import MegatronLogCallback
from .log import say
from .outputs import plot_losses, save_final
from .processes import prepare_processes
from .publish import check_hub_push, push_to_hub
from .setup import build_layout
from .trainer import MegatronTrainer, check_finite_weights, trainer_arguments

HEADS = {  # task.head -> (model class, Auto class, name of the task head module)
    "sequence_classification": (MegatronBertForSequenceClassification, AutoModelForSequenceClassification,
                                "classification_head"),
    "multiple_choice": (MegatronBertForMultipleChoice, AutoModelForMultipleChoice, "multichoice_head"),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def load_finetune_recipe(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> FinetuneRecipe:
    """Read a fine-tuning recipe and apply `--key value` overrides; `RecipeError` names the key, the value and the
    fix. The checks that need the model or the data run at the start of `run_finetune`."""
    return parse_recipe(FinetuneRecipe, path, overrides)


@dataclass
class FinetuneResult:
    """What a run leaves behind: the fine-tuned model (in memory), its tokenizer, the Trainer and results.json."""

    model: Any
    tokenizer: Any
    trainer: MegatronTrainer
    results: dict[str, Any]
    output_dir: Path


def run_finetune(recipe: FinetuneRecipe, callbacks: list[TrainerCallback] | None = None) -> FinetuneResult:
    """Fine-tune as the recipe says and write the run's outputs. Under a launcher (torchrun, accelerate launch) every
    process calls it. Everything the user gave is checked before anything is computed or written."""
    start = time.perf_counter()
    recipe.validate()
    task = get_task(recipe.task.task)
    source = resolve_model(recipe, task)
    layout = build_layout(recipe)
    check_layout(recipe, source, layout)
    check_hub_push(recipe)  # a push that cannot happen is refused before any training
    prepare_processes(layout)
    set_seed(recipe.run.seed)
    tokenizer = load_tokenizer(recipe, source)
    raw, dataset_path = load_data(recipe, task)
    recipe = plan_steps(recipe, layout, len(raw[task.train_split]))
    args = finetune_arguments(recipe, layout)  # starts the process group under a launcher
    if args.world_size != layout.world_size:
        raise RecipeError(f"the launcher started {args.world_size} processes but WORLD_SIZE says {layout.world_size}")
    data = featurize(task, raw, tokenizer, recipe, args)
    model = build_task_model(recipe, task, source, tokenizer, layout)
    model = apply_peft(recipe, task, model)
    describe(recipe, task, model, layout, data)
    trainer = build_trainer(recipe, task, model, tokenizer, data, args, callbacks)
    dev = train_and_evaluate(trainer)
    predictions = predict_test_splits(trainer, task, data, Path(recipe.run.output_dir))
    results = collect_results(recipe, task, layout, trainer, dev, predictions, dataset_path, len(data.train))
    output_dir = write_outputs(recipe, task, trainer, model, tokenizer, results, start)
    push_to_hub(recipe, output_dir)
    return FinetuneResult(model=model, tokenizer=tokenizer, trainer=trainer, results=results, output_dir=output_dir)


def finetune(recipe: FinetuneRecipe) -> dict[str, Any]:
    """Fine-tune as the recipe says, write the outputs; return results.json's mapping."""
    return run_finetune(recipe).results


# ---------------------------------------------------------------------- checks before anything is computed


@dataclass(frozen=True)
class ModelSource:
    """Where the pretrained weights come from: a folder (or Hub id) and its config, or a preset (random weights)."""

    name: str
    config: MegatronBertConfig
    pretrained: bool  # False: a preset, randomly initialised
    has_tokenizer: bool


def resolve_model(recipe: FinetuneRecipe, task: FinetuneTask) -> ModelSource:
    """Read the model's config (no weights) and refuse a model that cannot do the task."""
    name = recipe.task.model
    if name in BERT_PRESETS:
        say(f"WARNING: model={name!r} is a preset: fine-tuning starts from RANDOM weights, not a pretrained BERT; give "
            "a pretrained folder (e.g. a `megahf pretrain` run's final/) for meaningful results")
        return ModelSource(name, MegatronBertConfig.from_preset(name), pretrained=False, has_tokenizer=False)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise RecipeError(f"recipe key model={name!r}: cannot read its config.json "
                          f"({str(error).splitlines()[0]}); give a pretrained model folder") from None
    model_type = getattr(config, "model_type", None)
    if model_type in ("bert", "megatron-bert"):
        raise RecipeError(
            f"recipe key model={name!r} is a transformers {model_type!r} folder: convert it to megahf's BERT first "
            "(megahf.convert.hf_bert.from_transformers(model).save_pretrained(folder)) and give that folder"
        )
    if not isinstance(config, MegatronBertConfig):
        raise RecipeError(
            f"recipe key model={name!r} is a {model_type!r} model ({type(config).__name__}): {task.name} needs a BERT "
            f"encoder with a {task.head.replace('_', '-')} head (MegatronBert, model_type 'megatron_bert'); give a "
            "`megahf pretrain` BERT run's final/ or a converted BERT folder"
        )
    # a folder's own tokenizer if it holds one; a Hub repo's always (the shipped one would silently mismatch it)
    has_tokenizer = (any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES) if os.path.isdir(name)
                     else True)
    return ModelSource(name, config, pretrained=True, has_tokenizer=has_tokenizer)


def check_layout(recipe: FinetuneRecipe, source: ModelSource, layout: ParallelLayout) -> None:
    """The model fits the sequence length and the tensor-parallel size; QLoRA's device is one bitsandbytes has."""
    config, n = source.config, recipe.task.max_seq_length
    if n > config.max_position_embeddings:
        raise RecipeError(
            f"recipe key max_seq_length={n} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings} ({source.name}); lower max_seq_length to at most "
            f"{config.max_position_embeddings}"
        )
    tp = layout.tensor_parallel_size
    try:
        config.check_tensor_parallel(tp)
    except ValueError as error:
        raise RecipeError(f"recipe key tensor_parallel_size={tp} does not fit model={source.name!r}: {error}"
                          .replace("tp_size=", "tensor_parallel_size=")) from None
    if recipe.peft.peft == "qlora" and not source.pretrained:
        raise RecipeError(f"recipe key peft='qlora' quantizes pretrained weights as they load; model={source.name!r} "
                          "is a preset: give a pretrained folder, or peft: lora")


def load_tokenizer(recipe: FinetuneRecipe, source: ModelSource):
    """The recipe's tokenizer, else the model folder's own, else the shipped BERT WordPiece; it must be a BERT
    tokenizer whose ids fit the model's vocabulary."""
    name = recipe.task.tokenizer or (source.name if source.has_tokenizer else EMBEDDED_BERT_TOKENIZER)
    key = "tokenizer" if recipe.task.tokenizer else "model"
    try:
        tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_path(name) or name)
    except (OSError, ValueError) as error:
        raise RecipeError(f"recipe key {key}={name!r}: its tokenizer cannot be loaded "
                          f"({str(error).splitlines()[0]}); give a tokenizer folder or "
                          f"'{EMBEDDED_BERT_TOKENIZER}'") from None
    missing = [t for t in ("cls", "sep", "pad") if getattr(tokenizer, f"{t}_token_id") is None]
    if missing:
        raise RecipeError(f"recipe key {key}={name!r}: the tokenizer has no {', '.join(missing)} token; BERT "
                          f"fine-tuning needs [CLS], [SEP] and [PAD] (e.g. '{EMBEDDED_BERT_TOKENIZER}')")
    if len(tokenizer) > source.config.vocab_size:
        raise RecipeError(
            f"recipe key {key}={name!r} has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{source.config.vocab_size}: its ids would index past the embeddings; use the tokenizer the model was "
            "pretrained with"
        )
    return tokenizer


def load_data(recipe: FinetuneRecipe, task: FinetuneTask):
    """The task's splits (checked by the task: splits, columns, labels) and the local folder they came from."""
    folder = fixture_path(task.name) if recipe.task.smoke else recipe.task.dataset
    if recipe.task.smoke:
        say(f"smoke run: the {task.name} fixture shipped with megahf ({folder}), NOT the real data set")
    raw = task.load(None if folder is None else str(folder))
    return raw, (None if folder is None else str(folder))


def plan_steps(recipe: FinetuneRecipe, layout: ParallelLayout, train_rows: int) -> FinetuneRecipe:
    """The recipe with train_steps and warmup_steps resolved: Megatron's finetune trains `epochs` passes of
    train_rows // global batch steps (its loader drops the last partial batch), and warms up over
    warmup_fraction of them."""
    optim = recipe.optim
    per_epoch = max(1, train_rows // layout.global_batch_size)
    steps = optim.train_steps or recipe.task.epochs * per_epoch
    warmup = optim.warmup_steps or int(optim.warmup_fraction * steps)
    if warmup >= steps:
        raise RecipeError(f"recipe key warmup_steps={warmup} is not smaller than train_steps={steps}; lower it")
    how = (f"train_steps={steps} as given ({steps / per_epoch:.2f} epochs)" if optim.train_steps else
           f"{steps} steps = {recipe.task.epochs} epochs x {per_epoch} ({train_rows:,} rows // global batch "
           f"{layout.global_batch_size})")
    say(f"training {how}, warmup {warmup} steps")
    optim = dataclasses.replace(optim, train_steps=steps, warmup_steps=warmup, warmup_fraction=0.0)
    return dataclasses.replace(recipe, optim=optim)


def finetune_arguments(recipe: FinetuneRecipe, layout: ParallelLayout):
    return trainer_arguments(
        recipe.optim, recipe.parallel, recipe.run, layout, num_workers=recipe.task.num_workers,
        optim="adamw_bnb_8bit" if recipe.optim.optim == "adamw_bnb_8bit" else "adamw_torch_fused",
        remove_unused_columns=False,  # the task's collate drops idx / example_id itself
        label_names=["labels"],
    )


# ---------------------------------------------------------------------- data, model, peft


@dataclass
class TaskData:
    """Token features of every split a run uses, and the rows they came from (for metrics and prediction files)."""

    train: Any
    evals: dict[str, tuple[Any, Any]]  # split -> (raw rows, features)
    tests: dict[str, tuple[Any, Any]]


def featurize(task: FinetuneTask, raw, tokenizer, recipe: FinetuneRecipe, args) -> TaskData:
    n = recipe.task.max_seq_length
    with args.main_process_first(desc="featurize"):  # the first process writes the map cache, the others read it
        def feats(split: str):
            features = task.featurize(raw[split], tokenizer, n)
            if len(features) != len(raw[split]):
                raise RuntimeError(f"featurize gave {len(features)} rows for {len(raw[split])} in {split}")
            return features

        return TaskData(
            train=feats(task.train_split),
            evals={s: (raw[s], feats(s)) for s in task.eval_splits},
            tests={s: (raw[s], feats(s)) for s in task.test_splits if s in raw},
        )


def build_task_model(recipe: FinetuneRecipe, task: FinetuneTask, source: ModelSource, tokenizer,
                     layout: ParallelLayout):
    """The pretrained encoder with a new task head (random weights from the recipe's seed, the same on every rank),
    sharded as the layout says. QLoRA loads the linear layers in 4-bit nf4."""
    model_class, auto_class, head = HEADS[task.head]
    labels: dict[str, Any] = {"pad_token_id": tokenizer.pad_token_id}
    if task.head == "sequence_classification":
        labels.update(num_labels=task.num_labels,
                      problem_type="regression" if task.is_regression else "single_label_classification")
        if task.label_names:
            labels.update(id2label=dict(enumerate(task.label_names)),
                          label2id={name: i for i, name in enumerate(task.label_names)})
    torch.manual_seed(recipe.run.seed)
    if not source.pretrained:
        config = MegatronBertConfig.from_preset(source.name, vocab_size=len(tokenizer), **labels)
        model = model_class(config)
        say(f"model: {source.name} with a new {head} (random weights everywhere)")
    else:
        quantization = qlora_loading(task, head) if recipe.peft.peft == "qlora" else {}
        try:
            # A head of another size (a model fine-tuned on MNLI, continued on RTE) is re-initialised, not refused;
            # any other tensor of the wrong size is refused below.
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()  # its table of unused and new weights: the one line below says it
            try:
                model, info = auto_class.from_pretrained(source.name, output_loading_info=True,
                                                         ignore_mismatched_sizes=True, **labels, **quantization)
            finally:
                hf_logging.set_verbosity(verbosity)
        except (RuntimeError, ValueError, ImportError) as error:
            if quantization:
                raise RecipeError(f"recipe key peft='qlora': bitsandbytes cannot load a 4-bit model here "
                                  f"({str(error).splitlines()[0]}); use peft: lora") from None
            raise
        if not isinstance(model, model_class):
            raise RecipeError(f"recipe key model={source.name!r} loaded as {type(model).__name__}, not "
                              f"{model_class.__name__}")
        new = sorted({*info["missing_keys"], *(m[0] for m in info.get("mismatched_keys", []))})
        stray = [k for k in new if not k.startswith(head)]
        if stray:
            raise RecipeError(
                f"recipe key model={source.name!r}: {len(stray)} encoder tensors are missing from its weights or of "
                f"another shape (e.g. {stray[0]}); give a complete pretrained BERT folder"
            )
        dropped = sorted({k.split(".")[0] for k in info["unexpected_keys"]})
        outputs = 1 if task.head == "multiple_choice" else task.num_labels
        fate = (f"newly initialised ({outputs} output{'s' if outputs > 1 else ''})" if new else
                "loaded from the folder (continuing its fine-tuning)")
        heads = f"its other heads dropped ({', '.join(dropped)})" if dropped else "no other head in the folder"
        say(f"model: {source.name}: pretrained encoder loaded, {heads}; task head {head} {fate}")
    if layout.sharded:
        model = distribute_model(model, layout.distributed_config())
    return model


def qlora_loading(task: FinetuneTask, head: str) -> dict[str, Any]:
    """`from_pretrained` arguments of QLoRA's base: every linear layer but the task head in 4-bit nf4 (double
    quantization, as the QLoRA paper), computing in bf16 on GPUs and fp32 on CPU."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as error:
        raise RecipeError(f"recipe key peft='qlora' needs bitsandbytes ({error}); install megahf[tasks] or use "
                          "peft: lora") from None
    compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"  # this process's GPU
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=[head])
    return {"quantization_config": config, "device_map": {"": device}}


def lora_target_pattern(names: list[str]) -> str:
    """peft's regex form of `lora_target_modules` (`*` within one module name), matched on full module names."""
    alternatives = "|".join(re.escape(n).replace(r"\*", r"[^.]*") for n in names)
    return rf"(?:.*\.)?(?:{alternatives})"


def apply_peft(recipe: FinetuneRecipe, task: FinetuneTask, model):
    """LoRA (and QLoRA's k-bit preparation) with the task head trained fully; the model itself for peft: none."""
    method = recipe.peft.peft
    if method == "none":
        return model
    _, _, head = HEADS[task.head]
    names = recipe.peft.target_names
    # nn.Linear, or bitsandbytes' Linear4bit under QLoRA
    linear_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    pattern = lora_target_pattern(names)
    for name in names:
        one = lora_target_pattern([name])
        if not any(re.fullmatch(one, n) for n in linear_names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names if not n.startswith(head)})
            raise RecipeError(f"recipe key lora_target_modules={recipe.peft.lora_target_modules!r}: {name!r} names "
                              f"no linear layer of the model; its linear layers are {', '.join(leaves)}")
    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=recipe.peft.lora_rank, lora_alpha=recipe.peft.lora_alpha,
                        lora_dropout=recipe.peft.lora_dropout, target_modules=pattern, modules_to_save=[head],
                        task_type="SEQ_CLS" if task.head == "sequence_classification" else None)
    return get_peft_model(model, config)


def describe(recipe: FinetuneRecipe, task: FinetuneTask, model, layout: ParallelLayout, data: TaskData) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    peft = {"none": "full fine-tuning", "lora": f"LoRA r={recipe.peft.lora_rank}",
            "qlora": f"QLoRA (4-bit nf4 base) r={recipe.peft.lora_rank}"}[recipe.peft.peft]
    dev = ", ".join(f"{split} {len(features):,}" for split, (_, features) in data.evals.items())
    test = ", ".join(f"{split} {len(features):,}" for split, (_, features) in data.tests.items())
    say(f"{task.name}: {len(data.train):,} train rows, dev {dev}{'; test ' + test if test else ''}; "
        f"max_seq_length {recipe.task.max_seq_length}")
    optim = recipe.optim
    say(f"{peft}: {trainable / 1e6:.3f}M of {total / 1e6:.3f}M parameters trained (this rank's share); "
        f"{optim.optim}, lr {optim.learning_rate:g} {optim.lr_schedule} -> {optim.min_learning_rate:g}; "
        f"{layout.describe()}")


# ---------------------------------------------------------------------- training and evaluation


class FinetuneTrainer(MegatronTrainer):
    """MegatronTrainer whose evaluation scores the task's dev split(s) with the task's metrics."""

    def __init__(self, *args, task: FinetuneTask, data: TaskData, **kwargs):
        self.task = task
        self.data = data
        self.dev_results: dict[int, dict[str, dict[str, float]]] = {}  # step -> split -> metric -> value
        self.dev_losses: dict[int, dict[str, float]] = {}  # step -> split -> the training loss on it
        super().__init__(*args, **kwargs)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Score every dev split (Trainer calls this every eval_interval); logs eval_loss of the main split and
        eval_{split}_{metric}."""
        results = self.evaluate_dev()
        main = self.task.eval_splits[0]
        logs = {"eval_loss": results[main].pop("loss")}
        for split, metrics in results.items():
            metrics.pop("loss", None)
            logs.update({f"{metric_key_prefix}_{split}_{k}": v for k, v in metrics.items()
                         if isinstance(v, (int, float))})
        self.log(logs)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics=logs)
        return logs

    def evaluate_dev(self) -> dict[str, dict[str, float]]:
        results = {}
        for split, (rows, features) in self.data.evals.items():
            logits = predict_logits(self, features)
            references = np.asarray(features["labels"])
            metrics = {k: v if isinstance(v, int) else float(v) for k, v in self.task.compute_metrics(
                predictions_of(self.task, logits), references, split=rows).items()}
            results[split] = {**metrics, "loss": dev_loss(self.task, logits, references)}
        self.dev_results[self.state.global_step] = {s: {k: v for k, v in m.items() if k != "loss"}
                                                    for s, m in results.items()}
        self.dev_losses[self.state.global_step] = {s: m["loss"] for s, m in results.items()}
        return {s: dict(m) for s, m in results.items()}


@torch.no_grad()
def predict_logits(trainer: MegatronTrainer, features) -> np.ndarray:
    """The model's logits for every row of `features`, in order, on every rank (the same batches everywhere, so
    sharded forwards run together and no rank's share has to be gathered)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    device = trainer.args.device
    loader = DataLoader(features, batch_size=trainer.args.per_device_eval_batch_size, shuffle=False,
                        collate_fn=trainer.data_collator)
    chunks = []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}  # test rows carry label -1
        with trainer.autocast_smart_context_manager():
            logits = model(**batch).logits
        chunks.append(logits.detach().float().cpu())
    model.train(was_training)
    return torch.cat(chunks).numpy()


def predictions_of(task: FinetuneTask, logits: np.ndarray) -> np.ndarray:
    return logits[:, 0] if task.is_regression else logits.argmax(-1)


def dev_loss(task: FinetuneTask, logits: np.ndarray, references: np.ndarray) -> float:
    """The training loss on the dev split: mean squared error (STS-B) or cross entropy."""
    logits_t = torch.from_numpy(logits)
    if task.is_regression:
        return F.mse_loss(logits_t[:, 0], torch.from_numpy(references).float()).item()
    return F.cross_entropy(logits_t, torch.from_numpy(references).long()).item()


def build_trainer(recipe: FinetuneRecipe, task: FinetuneTask, model, tokenizer, data: TaskData, args,
                  callbacks: list[TrainerCallback] | None) -> FinetuneTrainer:
    pad = tokenizer.pad_token_id

    def collate(features):
        return task.collate(features, pad)

    trainer = FinetuneTrainer(
        model=model,
        args=args,
        data_collator=collate,
        train_dataset=data.train,
        eval_dataset=data.evals[task.eval_splits[0]][1],
        processing_class=tokenizer,
        recipe=recipe,
        task=task,
        data=data,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(MegatronLogCallback(0, perplexity=False))
    for callback in callbacks or []:
        trainer.add_callback(callback)
    return trainer


def train_and_evaluate(trainer: FinetuneTrainer) -> dict[str, dict[str, float]]:
    """Train, then score the dev split(s) at the end (logged like the periodic evaluations, unless the last step just
    had one); split -> metric -> value."""
    trainer.train()
    if trainer.state.global_step not in trainer.dev_results:
        trainer.evaluate()
    return trainer.dev_results[trainer.state.global_step]


def predict_test_splits(trainer: FinetuneTrainer, task: FinetuneTask, data: TaskData,
                        output_dir: Path) -> dict[str, str]:
    """Write one prediction file per test split (every rank predicts, rank 0 writes); split -> relative path."""
    written = {}
    for split, (rows, features) in data.tests.items():
        predictions = predictions_of(task, predict_logits(trainer, features))
        relative = Path("predictions") / task.prediction_file_name(split)
        if is_rank_zero():
            (output_dir / "predictions").mkdir(parents=True, exist_ok=True)
            task.write_predictions(output_dir / relative, rows, predictions)
        written[split] = relative.as_posix()
    return written


# ---------------------------------------------------------------------- outputs


def collect_results(recipe: FinetuneRecipe, task: FinetuneTask, layout: ParallelLayout, trainer: FinetuneTrainer,
                    dev: dict[str, dict[str, float]], predictions: dict[str, str], dataset_path: str | None,
                    train_rows: int) -> dict[str, Any]:
    """results.json's mapping (the schema is in the module docstring)."""
    main = task.eval_splits[0]
    return {
        "task": task.name,
        "dataset": task.hub_name,
        "dataset_config": task.hub_config,
        "dataset_path": dataset_path,
        "smoke": recipe.task.smoke,
        "split": main,
        "main_metric": task.main_metric,
        "metrics": dict(dev[main]),
        "eval_splits": list(task.eval_splits),
        **{split: dict(dev[split]) for split in task.eval_splits},
        "dev_loss": dict(trainer.dev_losses[trainer.state.global_step]),
        "predictions": predictions,
        "model": recipe.task.model,
        "peft": recipe.peft.peft,
        "optim": recipe.optim.optim,
        "steps": trainer.state.global_step,
        "epochs": recipe.task.epochs,
        "train_rows": train_rows,
        "global_batch_size": layout.global_batch_size,
        "learning_rate": recipe.optim.learning_rate,
        "max_seq_length": recipe.task.max_seq_length,
        "seed": recipe.run.seed,
        "layout": layout.describe(),
    }


def results_markdown(results: dict[str, Any]) -> str:
    """results.md: one row per (dev split, metric)."""
    fixture = " (shipped FIXTURE, not the real data)" if results["smoke"] else ""
    lines = [f"# {results['task']}: {results['model']}{fixture}", "",
             f"Dataset {results['dataset']} ({results['dataset_config']}); main metric {results['main_metric']} on "
             f"{results['split']}; {results['steps']} steps, peft {results['peft']}, optim {results['optim']}.", "",
             "| split | metric | value |", "|---|---|---|"]
    for split in results["eval_splits"]:
        for metric, value in results[split].items():
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {split} | {metric} | {shown} |")
    return "\n".join(lines) + "\n"


def write_outputs(recipe: FinetuneRecipe, task: FinetuneTask, trainer: FinetuneTrainer, model, tokenizer,
                  results: dict[str, Any], start: float) -> Path:
    """`final/` (every rank: a sharded model is gathered), then on rank 0 results.json, results.md, loss.png and
    recipe.yaml, each written atomically."""
    output_dir = Path(recipe.run.output_dir)
    if is_rank_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
    check_finite_weights(model, "final model")
    final = save_final(model, tokenizer, output_dir)
    main = results["metrics"]
    if is_rank_zero():
        plot_losses(trainer.state.log_history, output_dir / "loss.png",
                    f"{task.name}: {results['steps']} steps, {results['split']} {task.main_metric} "
                    f"{main.get(task.main_metric, float('nan')):.3f}",
                    ylabel="mean squared error" if task.is_regression else "cross entropy (nats/example)")
        save_recipe(recipe, output_dir / "recipe.yaml")
        atomic_write_json(output_dir / "results.json", results, indent=2)
        atomic_write_text(output_dir / "results.md", results_markdown(results))
        saved = "the peft adapter (PeftModel.from_pretrained)" if recipe.peft.peft != "none" else "the model"
        say(f"saved {final} ({saved}), results.json, results.md, loss.png"
            f"{', predictions/' if results['predictions'] else ''} in {output_dir}")
    barrier()
    figures = "; ".join(f"{split} " + ", ".join(f"{k} {v:.4f}" for k, v in results[split].items()
                                                 if isinstance(v, float))
                        for split in results["eval_splits"])
    say(f"done in {time.perf_counter() - start:.0f}s: {figures}")
    return output_dir


__all__ = ["FinetuneResult", "FinetuneTrainer", "finetune", "load_finetune_recipe", "lora_target_pattern",
           "run_finetune"]
