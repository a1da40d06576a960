from starcoder2.infer.speculative import prompt_lookup_draft


def test_finds_most_recent_longest_ngram():
    toks = [1, 2, 3, 9, 9, 1, 2, 3, 7, 7, 5, 1, 2, 3]
    assert prompt_lookup_draft(toks, max_draft=3) == [7, 7, 5]  # the later "1 2 3" wins
    assert prompt_lookup_draft([4, 5, 6, 4, 5], max_draft=2) == [6, 4]
    assert prompt_lookup_draft([4, 5, 6, 7, 5], max_draft=5, max_ngram=3) == [6, 7, 5]  # falls back to 1-gram


def test_no_match_gives_empty():
    assert prompt_lookup_draft([1, 2, 3, 4]) == []
    assert prompt_lookup_draft([1]) == []
    assert prompt_lookup_draft([]) == []
