"""Token data: the corpus (`corpus`: the default corpus and local text; `tfds`: TFDS datasets
through seqio, imported only when asked for), its tokenizer (`tokenizer`), the token cache
writer (`prepare`) and reader (`cache`: where a training batch comes from)."""

from relu_sparsity.data.cache import TokenCache, default_cache_dir, open_cache
from relu_sparsity.data.corpus import (
    DEFAULT_CORPUS,
    DefaultCorpus,
    Document,
    LocalText,
    default_corpus_files,
)
from relu_sparsity.data.prepare import prepare

__all__ = ["DEFAULT_CORPUS", "DefaultCorpus", "Document", "LocalText", "TokenCache",
           "default_cache_dir", "default_corpus_files", "open_cache", "prepare"]
