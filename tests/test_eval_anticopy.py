"""The offline re-ranking study of the commit answer's candidate lines (`p2p_lab.eval.anticopy`)."""

from p2p_lab.eval.anticopy import choose, evaluate, overlap, words


def _rec(cands, query="", target="fix parser", user="u", i=0):
    return {"candidates": cands, "query": query, "target": target, "text": cands[0][0], "user": user, "i": i,
            "real_copy": False}


def test_words_split_identifiers_and_overlap_counts_the_line_s_words_in_the_query() -> None:
    assert words("Fix parseConfig in config_loader.py") == {"fix", "parse", "config", "loader"}
    assert overlap("Fix the loader", words("src/config_loader.py")) == 1 / 3  # "fix", "the", "loader"


def test_choose_reorders_the_kept_lines_by_query_overlap_but_never_lifts_a_demoted_copy() -> None:
    query = "files: src/tokenizer.py\n@@ -1 +1 @@\n-def tokenize(text):\n+def tokenize(text, strict):"
    cands = [["Update docs", -0.5, False, 0], ["Add strict mode to tokenize", -0.8, False, 1],
             ["tokenize strict tokenizer", -0.2, True, 2]]  # the best-scoring and most overlapping line is a copy
    rec = _rec(cands, query)
    assert choose(rec, 1.0) == "Update docs"  # the app's rule: branch order, the copy demoted
    assert choose(rec, 1.0, weight=2.0) == "Add strict mode to tokenize"
    assert choose(rec, None) == "Update docs"  # the greedy line


def test_evaluate_adds_the_overlap_rules_and_the_ceiling() -> None:
    recs = [_rec([["fix parser", -1.0, False, 0], ["update parser docs", -0.9, False, 1]], "files: parser.py", user=u)
            for u in ("a", "b", "c")]
    res = evaluate(recs, boot=50, query_overlap=True)
    rules = {r["rule"]: r for r in res["rules"]}
    assert "margin 1 + overlap x1" in rules
    assert rules["best line (knows the answer)"]["rougeL"]["value"] == 1.0
    assert "margin 1 + overlap x1" not in {r["rule"] for r in evaluate(recs, boot=50)["rules"]}
