"""The tokenizer trains on the train split only: a word that occurs only in eval documents never
becomes a piece, while a word as frequent in train documents does."""

import sentencepiece as spm

from relu_sparsity import data
from relu_sparsity.data.corpus import eval_score

EVAL_FRACTION = 0.3
EVAL_WORD = "zyzzogeton"  # only in eval documents
TRAIN_WORD = "marmalade"  # only in train documents, as often


def test_a_word_only_in_eval_documents_never_becomes_a_piece(tmp_path):
    """Pieces of the trained model against the words the split's hash rule put on each side
    (recomputed here from the document names)."""
    corpus = tmp_path / "docs"
    corpus.mkdir()
    names = [f"doc_{i:02d}.md" for i in range(12)]
    is_eval = {n: eval_score(f"docs/{n}", 0) < EVAL_FRACTION for n in names}
    assert 0 < sum(is_eval.values()) < len(names)  # both splits by the hash rule alone
    filler = "the cat sat on the mat and the dog ran to the tree\n" * 20
    for name in names:
        word = EVAL_WORD if is_eval[name] else TRAIN_WORD
        (corpus / name).write_text(filler + f"a {word} b\n" * 100)
    out = data.prepare(tmp_path / "cache", [str(corpus)], vocab_size=400,
                       eval_fraction=EVAL_FRACTION, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    pieces = {sp.id_to_piece(i) for i in range(sp.get_piece_size())}
    assert "\u2581" + TRAIN_WORD in pieces  # a frequent train word is a piece
    assert not {EVAL_WORD, "\u2581" + EVAL_WORD} & pieces
    assert len(sp.encode(" " + EVAL_WORD)) > 1
