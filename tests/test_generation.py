"""Logits processors, sampling and the compiled cached decode path."""
import numpy as np
import pytest

from conftest import golden
from mindglm.config import ConfigError
from mindglm.generation.config import GenerationConfig
from mindglm.generation.processors import (apply_repetition_penalty, apply_top_k, apply_top_p, choose_tokens,
                                           guard_invalid_scores, process_scores)


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    scores = np.array([[2.0, -2.0, 1.0, 4.0]], np.float32)
    out = apply_repetition_penalty(scores, np.array([[0, 1, 1]]), 2.0)
    np.testing.assert_array_equal(out, [[1.0, -4.0, 1.0, 4.0]])


def test_top_k_keeps_the_k_best():
    scores = np.array([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = apply_top_k(scores, 2)
    assert np.isfinite(out).sum() == 2 and np.isfinite(out[0, [1, 3]]).all()


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_p(np.log(probs), 0.75)      # 0.5 + 0.3 >= 0.75: two tokens survive
    assert np.isfinite(out[0]).tolist() == [True, True, False, False]
    out = apply_top_p(np.log(probs), 0.5)       # the best token alone reaches 0.5
    assert np.isfinite(out[0]).tolist() == [True, False, False, False]


def test_invalid_scores_reset_only_the_bad_row():
    scores = np.array([[1.0, np.nan, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    out = guard_invalid_scores(scores)
    assert out[0].argmax() == 5 and out[0, 5] == 5e4 and (np.delete(out[0], 5) == 0).all()
    np.testing.assert_array_equal(out[1], scores[1])


def test_sampling_is_reproducible_with_a_seed_and_follows_the_distribution():
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
    scores = np.log(np.array([[0.7, 0.2, 0.1]] * 4000))
    first = choose_tokens(process_scores(scores, np.zeros((4000, 1), int), config), config, np.random.default_rng(3))
    second = choose_tokens(process_scores(scores, np.zeros((4000, 1), int), config), config, np.random.default_rng(3))
    np.testing.assert_array_equal(first, second)
    frequencies = np.bincount(first, minlength=3) / 4000
    np.testing.assert_allclose(frequencies, [0.7, 0.2, 0.1], atol=0.03)


def test_greedy_ignores_sampling_knobs():
    config = GenerationConfig(do_sample=False, temperature=0.1, top_k=1)
    scores = np.array([[0.1, 0.3, 0.2]])
    assert choose_tokens(process_scores(scores, np.zeros((1, 1), int), config), config, None)[0] == 1


@pytest.mark.parametrize("bad", [dict(top_p=0.0), dict(temperature=0), dict(top_k=-1), dict(max_length="9"),
                                 dict(do_sample="yes")])
def test_bad_generation_settings_are_named(bad):
    with pytest.raises(ConfigError, match=list(bad)[0]):
        GenerationConfig(**bad)


def test_unknown_generation_setting_is_an_error(converted_models):
    with pytest.raises(ConfigError, match="top_q"):
        converted_models["chatglm2-tiny"].generate(np.array([[1, 2, 3]]), top_q=0.5)


def test_seeded_sampling_generation_is_reproducible(converted_models):
    model = converted_models["chatglm3-tiny"]
    prompt = golden("chatglm3-tiny")["single_input_ids"]
    settings = dict(max_new_tokens=10, do_sample=True, top_p=0.8, top_k=50, temperature=0.9, eos_token_id=-1)
    first = model.generate(prompt, seed=11, **settings)
    assert (first == model.generate(prompt, seed=11, **settings)).all()
    assert not (first == model.generate(prompt, seed=12, **settings)).all()


def test_repetition_penalty_changes_greedy_output(converted_models):
    model = converted_models["chatglm-tiny"]
    ref = golden("chatglm-tiny")
    prompt = ref["single_input_ids"]
    plain = model.generate(prompt, max_new_tokens=12, eos_token_id=-1)
    np.testing.assert_array_equal(plain, ref["single_generated"])   # it repeats 439 three times
    penalised = model.generate(prompt, max_new_tokens=12, eos_token_id=-1, repetition_penalty=5.0)
    new = penalised[0, prompt.shape[1]:].tolist()
    assert new.count(439) < plain[0, prompt.shape[1]:].tolist().count(439)


def test_cached_and_uncached_paths_agree_on_long_generation(converted_models):
    model = converted_models["chatglm-tiny"]
    prompt = golden("chatglm-tiny")["mask_input_ids"]
    cached = model.generate(prompt, max_new_tokens=20, eos_token_id=-1, use_past=True)
    exact = model.generate(prompt, max_new_tokens=20, eos_token_id=-1, use_past=False)
    np.testing.assert_array_equal(cached, exact)


def test_prompt_longer_than_the_context_is_a_clear_error(converted_models):
    model = converted_models["chatglm2-tiny"]
    too_long = np.ones((1, model.config.seq_length + 1), np.int64)
    with pytest.raises(ConfigError, match="seq_length|context|KV cache"):
        model.generate(too_long, max_new_tokens=2)


def test_bucket_padding_never_eats_the_reply_budget(converted_models):
    """A short prompt asking for every remaining slot of the context still fits."""
    model = converted_models["chatglm2-tiny"]
    prompt = np.arange(3, 23)[None, :]
    budget = model.config.seq_length - prompt.shape[1]
    out = model.generate(prompt, max_new_tokens=budget, eos_token_id=-1)
    assert out.shape == (1, model.config.seq_length)
    with pytest.raises(ConfigError, match="context"):
        model.generate(prompt, max_new_tokens=budget + 1, eos_token_id=-1)


def test_repetition_penalty_ignores_left_padding(converted_models):
    """A padded batch row generates what the same prompt generates alone, penalty included."""
    model = converted_models["chatglm3-tiny"]
    ref = golden("chatglm3-tiny")
    ids, mask = ref["batch_input_ids"], ref["batch_attention_mask"]
    settings = dict(max_new_tokens=8, eos_token_id=-1, repetition_penalty=1.5)
    batched = model.generate(ids, attention_mask=mask, **settings)
    alone = model.generate(ids[1:, mask[1] == 1], **settings)
    np.testing.assert_array_equal(batched[1, ids.shape[1]:], alone[0, mask[1].sum():])
