from dpolab.data.tokenize import truncate, with_eos


def test_short_pair_untouched():
    out = truncate([1, 2], [3, 4], [5], max_length=10, prompt_cap=5)
    assert (out.prompt_ids, out.chosen_ids, out.rejected_ids) == ([1, 2], [3, 4], [5])
    assert not (out.truncated_prompt or out.truncated_chosen or out.truncated_rejected)


def test_long_prompt_keeps_its_end():
    prompt = list(range(100, 130))  # 30 tokens, longer than max_length
    out = truncate(prompt, [1, 2, 3], [4, 5], max_length=20, prompt_cap=10)
    assert out.prompt_ids == prompt[-10:] and out.truncated_prompt
    assert out.chosen_ids == [1, 2, 3] and not out.truncated_chosen


def test_responses_cut_from_the_right():
    out = truncate([1] * 8, list(range(20)), list(range(5)), max_length=16, prompt_cap=8)
    assert out.chosen_ids == list(range(8)) and out.truncated_chosen
    assert out.rejected_ids == list(range(5)) and not out.truncated_rejected
    assert len(out.prompt_ids) + len(out.chosen_ids) == 16


def test_eos_appended_once():
    assert with_eos([1, 2], 9) == [1, 2, 9]
    assert with_eos([1, 9], 9) == [1, 9]
