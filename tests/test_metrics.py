"""Each metric against values worked out by hand (the arithmetic is in the comments)."""

import math

import pytest

from evaluators import EVALUATORS, EvalContext
from evaluators.bleu import char_bleu4, corpus_bleu
from evaluators.perplexity import perplexity_from_logprobs
from evaluators.rouge import rouge_scores
from harness.core.records import EvalSample


def test_corpus_bleu_13a_by_hand():
    # pred "the cat sat on the mat" vs ref "the cat sat on a mat": clipped n-gram precisions
    # 5/6, 3/5, 2/4, 1/3; equal lengths so BP = 1; BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4).
    score, tokenizer = corpus_bleu(["the cat sat on the mat"], ["the cat sat on a mat"])
    assert tokenizer == "13a"
    assert score == pytest.approx(100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25, abs=1e-6)


def test_corpus_bleu_uses_zh_tokenizer_for_chinese_references():
    # zh splits every CJK character: pred 7 chars, ref 8 chars. Precisions 7/7, 5/6, 3/5, 2/4;
    # BP = exp(1 - 8/7). As one 13a token per sentence this would score 0.
    score, tokenizer = corpus_bleu(["北京是中国首都"], ["北京是中国的首都"])
    assert tokenizer == "zh"
    assert score == pytest.approx(100 * math.exp(1 - 8 / 7) * (1 * 5 / 6 * 3 / 5 * 2 / 4) ** 0.25, abs=1e-6)


def test_char_bleu4_method3_by_hand():
    # chars "abce" vs "abcd": precisions 3/4, 2/3, 1/2, and 0/1 for 4-grams, which NIST smoothing
    # (method3) replaces by 1 / (2**1 * 1). BLEU = (3/4 * 2/3 * 1/2 * 1/2) ** (1/4).
    assert char_bleu4("abce", "abcd") == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25, abs=1e-6)
    assert char_bleu4("北京是首都", "北京是首都") == pytest.approx(100.0)


def test_rouge_english_by_hand():
    # rouge-chinese counts distinct n-grams for ROUGE-N. Unigrams: pred {the,cat,sat,on,mat},
    # ref {the,cat,sat,on,a,mat}: P=1, R=5/6, F=10/11. Bigrams: 3 of 5 on both sides: F=0.6.
    # ROUGE-L: LCS 5 over 6 tokens each side: F=5/6.
    s = rouge_scores("the cat sat on the mat", "the cat sat on a mat")
    assert s["rouge1"] == pytest.approx(100 * 10 / 11, abs=1e-4)
    assert s["rouge2"] == pytest.approx(60.0, abs=1e-4)
    assert s["rougeL"] == pytest.approx(100 * 5 / 6, abs=1e-4)


def test_rouge_chinese_is_word_level_by_hand():
    # jieba: 北京/是/首都 vs 北京/是/中国/的/首都. ROUGE-1 P=1, R=3/5, F=0.75.
    # Bigrams: (北京,是) shared; P=1/2, R=1/4, F=1/3. ROUGE-L: LCS 3, P=1, R=3/5, F=0.75.
    s = rouge_scores("北京是首都", "北京是中国的首都")
    assert s["rouge1"] == pytest.approx(75.0, abs=1e-4)
    assert s["rouge2"] == pytest.approx(100 / 3, abs=1e-4)
    assert s["rougeL"] == pytest.approx(75.0, abs=1e-4)


def test_rouge_empty_prediction_scores_zero():
    assert rouge_scores("", "北京是首都") == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_perplexity_is_token_weighted():
    # Sample NLLs 1+2 (two tokens) and 3 (one token): corpus exp(6/3); per sample exp(1.5) and exp(3).
    corpus, per = perplexity_from_logprobs([[-1.0, -2.0], [-3.0]])
    assert corpus == pytest.approx(math.exp(2.0))
    assert per == pytest.approx([math.exp(1.5), math.exp(3.0)])


def test_evaluators_average_per_sample_scores():
    samples = [EvalSample("a", "q1", "北京是中国的首都"), EvalSample("b", "q2", "the cat sat on a mat")]
    ctx = EvalContext(samples, predictions=["北京是首都", "the cat sat on a mat"])
    rouge = EVALUATORS["rouge"]().evaluate(ctx)
    assert rouge.per_sample["rouge1"] == pytest.approx([75.0, 100.0], abs=1e-4)
    assert rouge.metrics["rouge1"] == pytest.approx(87.5, abs=1e-4)
    bleu = EVALUATORS["bleu"]().evaluate(ctx)
    assert bleu.metrics["bleu4"] == pytest.approx(sum(bleu.per_sample["bleu4"]) / 2)
    assert bleu.per_sample["bleu4"][1] == pytest.approx(100.0)
