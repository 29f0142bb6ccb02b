"""Helpers of the evaluation tests (tests/tasks): the fixtures folder, a tiny MegatronGPT, a model whose argmax is
known."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from megahf import MegatronGPTConfig, MegatronGPTForCausalLM
from megahf.assets import ASSETS_DIR

FIXTURES = ASSETS_DIR / "fixtures"
VOCAB = 50257


def tiny_gpt(seed: int = 0, max_positions: int = 64) -> MegatronGPTForCausalLM:
    torch.manual_seed(seed)
    config = MegatronGPTConfig.from_preset("gpt-tiny", hidden_size=32, num_layers=2, num_attention_heads=2,
                                           hidden_dropout=0.0, attention_dropout=0.0, vocab_size=VOCAB,
                                           max_position_embeddings=max_positions)
    return MegatronGPTForCausalLM(config).eval()


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """`megahf ARGV` in this process: exit status, stdout, stderr."""
    from megahf.cli import main

    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


class BigramOracle(nn.Module):
    """A stand-in causal LM whose argmax is known: at every position it predicts `table[current token]` (token 0 for
    a token not in the table), with logit 1 there and 0 elsewhere. It ignores padding by construction, so it also
    shows which positions an evaluation reads."""

    def __init__(self, table: dict[int, int], vocab_size: int = VOCAB):
        super().__init__()
        self.table = table
        self.config = SimpleNamespace(vocab_size=vocab_size)

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.config.vocab_size)
        predicted = torch.tensor([[self.table.get(int(t), 0) for t in row] for row in input_ids])
        logits.scatter_(-1, predicted.unsqueeze(-1), 1.0)
        return SimpleNamespace(logits=logits)



def fitted_gpt(texts: list[str], tokenizer, steps: int = 15, seed: int = 0) -> MegatronGPTForCausalLM:
    """A tiny GPT trained a few full-batch AdamW steps to predict the last word of every other passage of `texts`
    (the loss only on the tokens of " " + that word), so that it gets some LAMBADA passages right and others wrong:
    a random model gets them all wrong, which would make comparisons vacuous."""
    from megahf.tasks.common import right_padded
    from megahf.tasks.lambada import featurize

    model = tiny_gpt(seed).train()
    examples = featurize(texts[::2], tokenizer, strict=True)
    input_ids, attention_mask = right_padded([e.tokens for e in examples], 0)
    labels = torch.full_like(input_ids, -100)
    for row, example in enumerate(examples):
        end = len(example.tokens)
        labels[row, end - example.num_labels: end] = input_ids[row, end - example.num_labels: end]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()
