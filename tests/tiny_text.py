"""A tiny random BERT for the text-conditioned tests: model and tokenizer in the save_pretrained layout, with a
WordPiece vocabulary of exactly the words of the texts the test will encode.

Why a helper: under transformers 5, `BertTokenizerFast(vocab_file=...)` ignores the file and keeps only the five
special tokens, so every report word became [UNK] and two captions differed by their length alone (the tests'
text conditioning tested nothing). `BertTokenizerFast.from_pretrained(folder)` on a folder holding vocab.txt reads
the vocabulary; `write_tiny_bert` then asserts that none of the texts maps to [UNK], so the bug cannot come back
unnoticed.
"""
import itertools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))     # the repository root: prep_data
import prep_data  # noqa: E402

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def basic_words(text):
    """The lower-case words and punctuation marks of `text` in order, as BERT's basic tokenizer splits it (lower
    case, split on white space and on each punctuation character)."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def words_of(texts):
    """Sorted distinct basic_words of `texts`: each is one whole-word vocabulary entry (no word pieces needed)."""
    return sorted({w for t in texts for w in basic_words(t)})


def phantom_texts():
    """Sentences covering every word the phantom's reports can hold: prep_data.report_sentences with its fixed
    phrasing (rng=None, as make_phantom calls it) for each label positive and uncertain, at every side and severity
    the phantom draws, plus the normal report."""
    neg = {lab: prep_data.NEG for lab in prep_data.LABELS}
    texts = prep_data.report_sentences({**neg, "No Finding": prep_data.POS})
    sides = {side for table in [prep_data.DEFAULT_SIDES, *prep_data.SIDES.values()] for side in table}
    for lab, code in itertools.product(prep_data.LABELS, (prep_data.POS, prep_data.UNC)):
        for side, sev in itertools.product(sorted(sides), prep_data.SEVERITIES):
            texts += prep_data.report_sentences({**neg, lab: code}, {lab: side}, {lab: sev})
    return sorted(set(texts))


def write_tiny_bert(folder, texts, layers=2, max_positions=128, seed=0):
    """Write a random BertModel (32 wide, 2 heads, FFN 64, `layers` layers) and its tokenizer to `folder`, the
    vocabulary being SPECIALS + words_of(texts); -> folder. Sizes: the tests' tiny encoders (our choice: the
    smallest that runs every code path; 2 heads so attention is multi-head)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    import torch
    words = words_of(texts)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(SPECIALS + words) + "\n")
    tok = BertTokenizerFast.from_pretrained(folder)                  # reads vocab.txt (the constructor would not)
    assert not [t for t in texts if tok.unk_token_id in tok(t)["input_ids"]], "a text maps to [UNK]"
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(SPECIALS) + len(words), hidden_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, intermediate_size=64,
                         max_position_embeddings=max_positions)).save_pretrained(folder)
    return folder
