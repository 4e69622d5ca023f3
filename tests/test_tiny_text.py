"""tests/tiny_text.py's tiny BERT, read back the way the scripts read it (dit_text2img.load_text_encoder, tokenize):
every phantom report maps to words of its vocabulary, never [UNK], and different reports to different token ids.
Under transformers 5 the tests' former `BertTokenizerFast(vocab_file=...)` kept only the special tokens: every word
was [UNK] and two reports of one length had the same ids, which the injectivity check below catches."""
import csv
import os

import torch

import dit_text2img as dt
from tiny_text import SPECIALS, basic_words, phantom_texts, write_tiny_bert


def test_phantom_reports_tokenize_to_distinct_ids_without_unk(tmp_path, phantom_dir):
    d = write_tiny_bert(str(tmp_path / "bert"), phantom_texts(), layers=1, max_positions=128)
    with open(os.path.join(phantom_dir, "meta.csv"), newline="") as f:
        reports = sorted({r["report"] for r in csv.DictReader(f)})
    tok, _ = dt.load_text_encoder(d)
    ids, lengths, n_tokens = dt.tokenize(tok, reports, 128)
    assert torch.equal(lengths, n_tokens)                                        # none truncated at 128
    assert tok.unk_token_id not in ids.tolist()                                  # every word is in the vocabulary
    words = sum(len(basic_words(r)) for r in reports)
    assert int((ids >= len(SPECIALS)).sum()) == words                           # one id per word: no word pieces
    # Different reports -> different id rows; the reports of one token count are most of them (the bug's case).
    assert len({tuple(row) for row in ids.tolist()}) == len(reports)
    assert len(reports) - len(set(lengths.tolist())) > len(reports) // 2
