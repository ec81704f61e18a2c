"""Parity with THUDM's reference implementation on the golden fixtures (float32)."""
import numpy as np
import pytest

from conftest import MODEL_NAMES, golden

ATOL = 1e-4


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_single_logits_match_reference(converted_models, name):
    ref = golden(name)
    logits = converted_models[name].logits(ref["single_input_ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["single_logits"].shape
    np.testing.assert_allclose(logits, ref["single_logits"], atol=ATOL, rtol=0)


def test_blank_infilling_logits_match_reference(converted_models):
    ref = golden("chatglm-tiny")
    logits = converted_models["chatglm-tiny"].logits(ref["mask_input_ids"])
    np.testing.assert_allclose(logits, ref["mask_logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["chatglm2-tiny", "chatglm3-tiny"])
def test_left_padded_batch_logits_match_reference(converted_models, name):
    ref = golden(name)
    mask = ref["batch_attention_mask"]
    real = mask.astype(bool)
    # positions derived from the mask alone, as THUDM's tokenizer builds them
    logits = converted_models[name].logits(ref["batch_input_ids"], attention_mask=mask)
    np.testing.assert_allclose(logits[real], ref["batch_logits"][real], atol=ATOL, rtol=0)
    explicit = converted_models[name].logits(ref["batch_input_ids"], attention_mask=mask,
                                             position_ids=ref["batch_position_ids"])
    np.testing.assert_allclose(explicit[real], ref["batch_logits"][real], atol=ATOL, rtol=0)


def _cases(name):
    return ["single", "mask"] if name == "chatglm-tiny" else ["single", "batch"]


@pytest.mark.parametrize("use_past", [False, True], ids=["no_cache", "kv_cache"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_greedy_generation_matches_reference(converted_models, name, use_past):
    ref = golden(name)
    model = converted_models[name]
    for case in _cases(name):
        prompt = ref[f"{case}_input_ids"]
        expected = ref[f"{case}_generated"]
        out = model.generate(prompt, attention_mask=ref.get(f"{case}_attention_mask"),
                             max_new_tokens=expected.shape[1] - prompt.shape[1], eos_token_id=-1,
                             use_past=use_past)
        np.testing.assert_array_equal(out, expected, err_msg=f"{name} {case} use_past={use_past}")


def test_rows_stop_on_their_own_eos(converted_models):
    """chatglm2-tiny's second batch row emits eos (2) at step 9: it stops, the other goes on."""
    ref = golden("chatglm2-tiny")
    model = converted_models["chatglm2-tiny"]
    prompt, mask = ref["batch_input_ids"], ref["batch_attention_mask"]
    expected = ref["batch_generated"]
    eos_step = int(np.where(expected[1, prompt.shape[1]:] == 2)[0][0])
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=12, eos_token_id=2)
    np.testing.assert_array_equal(out[0], expected[0])
    new_row1 = out[1, prompt.shape[1]:]
    np.testing.assert_array_equal(new_row1[: eos_step + 1], expected[1, prompt.shape[1]: prompt.shape[1] + eos_step + 1])
    assert (new_row1[eos_step + 1:] == model.config.pad_token_id).all()


def test_generation_stops_when_every_row_is_done(converted_models):
    ref = golden("chatglm3-tiny")
    model = converted_models["chatglm3-tiny"]
    prompt = ref["single_input_ids"]
    first = int(ref["single_generated"][0, prompt.shape[1]])
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=[first, 999])
    assert out.shape[1] == prompt.shape[1] + 1 and out[0, -1] == first
