"""megahf's stand-in for transformers' tests/generation/test_utils.py, which the sdist does not ship.

transformers' `GenerationTesterMixin` lives only in its git repository; PyPI's sdist carries `tests/*.py` but not
`tests/generation/`. This mixin is megahf's own, written against transformers 5.24's `generate` API, and checks the
contract that upstream's mixin checks for every in-tree causal LM:

* greedy `generate` picks the arg-max of a full forward pass at every step (so the cache changes nothing), with and
  without the cache, and its dict outputs (scores, logits, attentions, hidden states, cache) have the right shapes;
* sampling and beam search run and return the requested number of sequences; beam search is the same with and
  without the cache;
* left padding changes nothing (forward with position ids from the mask, and `generate` itself);
* `generate` from `inputs_embeds`, continuing from a returned cache, a static cache, prompt-lookup and assisted
  decoding all give greedy's tokens;
* the cache returned by a forward pass holds every layer's keys and values with the documented shapes.

Testers provide `model_tester.prepare_config_and_inputs_for_common()` (with `input_ids` and `attention_mask`) and the
test class `all_generative_model_classes` (from `ModelTesterMixin`).
"""

from __future__ import annotations

import copy
import inspect

import torch

from transformers import GenerationMixin, set_seed
from transformers.cache_utils import Cache
from transformers.testing_utils import torch_device


class GenerationTesterMixin:
    max_new_tokens = 4
    generation_atol = 1e-5
    generation_rtol = 1e-5

    # ---------------------------------------------------------------- helpers
    def _generation_config_and_inputs(self, batch_size=None, full_mask=True):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        if batch_size is not None:
            inputs = {k: v[:batch_size] for k, v in inputs.items()}
        if full_mask or "attention_mask" not in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        # Keep generated tokens away from the special ids (they would stop generation early)
        inputs["input_ids"] = inputs["input_ids"].clamp(min=3)
        return config, {k: v.to(torch_device) for k, v in inputs.items()}

    def _generation_model(self, model_class, config):
        set_seed(0)
        model = model_class(copy.deepcopy(config)).to(torch_device).eval()
        generation_config = model.generation_config
        generation_config.eos_token_id = None  # fixed-length outputs: generation never stops early
        generation_config.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        generation_config.do_sample = False
        return model

    def _generate(self, model, inputs, **kwargs):
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.max_new_tokens,
                  "do_sample": False, **kwargs}
        return model.generate(**inputs, **kwargs)

    def _greedy_without_cache(self, model, inputs, steps):
        """Reference greedy decoding: a full forward pass (no cache) for each new token."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        scores = []
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits[:, -1, :]
                scores.append(logits)
                next_tokens = logits.argmax(-1, keepdim=True)
                input_ids = torch.cat([input_ids, next_tokens], dim=-1)
                mask = torch.cat([mask, torch.ones_like(next_tokens)], dim=-1)
        return input_ids, scores

    def _assert_close(self, actual, expected, msg=None):
        torch.testing.assert_close(actual, expected, atol=self.generation_atol, rtol=self.generation_rtol, msg=msg)

    # ------------------------------------------------------------------ tests
    def test_inherits_generation_mixin(self):
        for model_class in self.all_generative_model_classes:
            self.assertTrue(issubclass(model_class, GenerationMixin), model_class.__name__)
            self.assertTrue(model_class.can_generate(), model_class.__name__)

    def test_greedy_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            output = self._generate(model, inputs)
            batch, length = inputs["input_ids"].shape
            self.assertEqual(output.shape, (batch, length + self.max_new_tokens))
            expected, _ = self._greedy_without_cache(model, inputs, self.max_new_tokens)
            self.assertListEqual(output.tolist(), expected.tolist())

    def test_greedy_generate_use_cache_matches_no_cache(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            kwargs = {"return_dict_in_generate": True, "output_scores": True}
            with_cache = self._generate(model, inputs, use_cache=True, **kwargs)
            without_cache = self._generate(model, inputs, use_cache=False, **kwargs)
            self.assertListEqual(with_cache.sequences.tolist(), without_cache.sequences.tolist())
            for a, b in zip(with_cache.scores, without_cache.scores):
                self._assert_close(a, b)

    def test_greedy_generate_dict_outputs(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            model.set_attn_implementation("eager")
            output = self._generate(model, inputs, use_cache=True, return_dict_in_generate=True, output_scores=True,
                                    output_logits=True, output_attentions=True, output_hidden_states=True)
            batch, length = inputs["input_ids"].shape
            config = model.config
            steps = self.max_new_tokens
            self.assertListEqual(output.sequences.tolist(), self._generate(model, inputs).tolist())
            self.assertEqual(len(output.scores), steps)
            self.assertEqual(len(output.logits), steps)
            for scores in (*output.scores, *output.logits):
                self.assertEqual(scores.shape, (batch, config.vocab_size))
            _, reference_scores = self._greedy_without_cache(model, inputs, steps)
            for logits, reference in zip(output.logits, reference_scores):
                self._assert_close(logits, reference)
            self.assertEqual(len(output.attentions), steps)
            self.assertEqual(len(output.hidden_states), steps)
            heads = config.num_attention_heads
            for step, (attentions, hidden_states) in enumerate(zip(output.attentions, output.hidden_states)):
                query = length if step == 0 else 1
                self.assertEqual(len(attentions), config.num_hidden_layers)
                for attention in attentions:
                    self.assertEqual(attention.shape, (batch, heads, query, length + step))
                self.assertEqual(len(hidden_states), config.num_hidden_layers + 1)
                for hidden in hidden_states:
                    self.assertEqual(hidden.shape, (batch, query, config.hidden_size))
            self.assertIsInstance(output.cache, Cache)
            self.assertEqual(output.cache.get_seq_length(), length + steps - 1)

    def test_sample_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            outputs = []
            for _ in range(2):
                set_seed(42)
                outputs.append(self._generate(model, inputs, do_sample=True, top_k=10, num_return_sequences=2))
            batch, length = inputs["input_ids"].shape
            self.assertEqual(outputs[0].shape, (2 * batch, length + self.max_new_tokens))
            self.assertListEqual(outputs[0].tolist(), outputs[1].tolist(), "same seed, different samples")
            self.assertTrue((outputs[0] < config.vocab_size).all(), "sampled a padding row of the vocabulary")

    def test_beam_search_generate(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            kwargs = {"num_beams": 2, "num_return_sequences": 2, "return_dict_in_generate": True,
                      "output_scores": True}
            with_cache = self._generate(model, inputs, use_cache=True, **kwargs)
            without_cache = self._generate(model, inputs, use_cache=False, **kwargs)
            batch, length = inputs["input_ids"].shape
            self.assertEqual(with_cache.sequences.shape, (2 * batch, length + self.max_new_tokens))
            self.assertListEqual(with_cache.sequences.tolist(), without_cache.sequences.tolist())
            self._assert_close(with_cache.sequences_scores, without_cache.sequences_scores)

    def test_left_padding_compatibility(self):
        """Left padding and position ids from the mask leave the last token's logits unchanged (forward pass)."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
            pad = config.pad_token_id if config.pad_token_id is not None else 0
            padded_ids = torch.cat([torch.full_like(input_ids[:, :3], pad), input_ids], dim=1)
            padded_mask = torch.cat([torch.zeros_like(mask[:, :3]), mask], dim=1)
            kwargs, padded_kwargs = {}, {}
            if "position_ids" in inspect.signature(model.forward).parameters:
                kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
                padded_kwargs["position_ids"] = (padded_mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                unpadded = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits[:, -1, :]
                padded = model(input_ids=padded_ids, attention_mask=padded_mask, **padded_kwargs).logits[:, -1, :]
            self._assert_close(padded, unpadded)

    def test_left_padding_generate(self):
        """`generate` on a left-padded batch gives each row the tokens it gets alone."""
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
            pad = config.pad_token_id if config.pad_token_id is not None else 0
            padded = {"input_ids": torch.cat([torch.full_like(input_ids[:, :3], pad), input_ids], dim=1),
                      "attention_mask": torch.cat([torch.zeros_like(mask[:, :3]), mask], dim=1)}
            expected = self._generate(model, inputs)[:, input_ids.shape[1]:]
            output = self._generate(model, padded)[:, padded["input_ids"].shape[1]:]
            self.assertListEqual(output.tolist(), expected.tolist())

    def test_generate_from_inputs_embeds(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            expected = self._generate(model, inputs)[:, inputs["input_ids"].shape[1]:]
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            output = self._generate(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
            self.assertListEqual(output.tolist(), expected.tolist())
            # with both, generate returns the prompt's ids too
            both = self._generate(model, {**inputs, "inputs_embeds": embeds})
            self.assertListEqual(both[:, inputs["input_ids"].shape[1]:].tolist(), expected.tolist())

    def test_generate_continue_from_cache(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            steps = self.max_new_tokens
            expected = self._generate(model, inputs, max_new_tokens=2 * steps, min_new_tokens=2 * steps)
            first = self._generate(model, inputs, return_dict_in_generate=True, use_cache=True)
            self.assertIsInstance(first.cache, Cache)
            sequences = first.sequences
            mask = torch.ones_like(sequences)
            second = self._generate(model, {"input_ids": sequences, "attention_mask": mask}, cache=first.cache,
                                    use_cache=True)
            self.assertListEqual(second.tolist(), expected.tolist())

    def test_generate_with_static_cache(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            dynamic = self._generate(model, inputs)
            static = self._generate(model, inputs, cache_implementation="static")
            self.assertListEqual(static.tolist(), dynamic.tolist())

    def test_prompt_lookup_decoding_matches_greedy_search(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs(batch_size=1)
            # a repeated prompt gives prompt lookup candidates to try (and to reject, which crops the cache)
            inputs = {k: torch.cat([v, v], dim=-1) for k, v in inputs.items()}
            model = self._generation_model(model_class, config)
            greedy = self._generate(model, inputs)
            lookup = self._generate(model, inputs, prompt_lookup_num_tokens=2, max_matching_ngram_size=2)
            self.assertListEqual(lookup.tolist(), greedy.tolist())

    def test_assisted_decoding_matches_greedy_search(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs(batch_size=1)
            model = self._generation_model(model_class, config)
            set_seed(1)
            assistant = model_class(copy.deepcopy(config)).to(torch_device).eval()  # different weights: rejections
            assistant.generation_config.num_assistant_tokens = 2
            assistant.generation_config.num_assistant_tokens_schedule = "constant"
            greedy = self._generate(model, inputs)
            assisted = self._generate(model, inputs, assistant_model=assistant)
            self.assertListEqual(assisted.tolist(), greedy.tolist())

    def test_cache_format(self):
        for model_class in self.all_generative_model_classes:
            config, inputs = self._generation_config_and_inputs()
            model = self._generation_model(model_class, config)
            with torch.no_grad():
                output = model(**inputs, use_cache=True)
            cache = output.cache
            self.assertIsInstance(cache, Cache)
            batch, length = inputs["input_ids"].shape
            self.assertEqual(len(cache.layers), config.num_hidden_layers)
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            head_dim = config.hidden_size // config.num_attention_heads
            for layer in cache.layers:
                self.assertEqual(layer.keys.shape, (batch, kv_heads, length, head_dim))
                self.assertEqual(layer.values.shape, (batch, kv_heads, length, head_dim))
            # the returned cache continues the sequence: the next token's logits match a full forward pass
            next_tokens = output.logits[:, -1:].argmax(-1)
            full_ids = torch.cat([inputs["input_ids"], next_tokens], dim=-1)
            full_mask = torch.ones_like(full_ids)
            with torch.no_grad():
                step = model(input_ids=next_tokens, attention_mask=full_mask, cache=cache, use_cache=True)
                full = model(input_ids=full_ids, attention_mask=full_mask, use_cache=False)
            self._assert_close(step.logits[:, -1], full.logits[:, -1])
