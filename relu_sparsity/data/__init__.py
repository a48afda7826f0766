"""Token data: the corpus (`corpus`), its tokenizer (`tokenizer`), the token cache writer
(`prepare`) and reader (`cache`: where a training batch comes from)."""

from relu_sparsity.data.cache import TokenCache, default_cache_dir, open_cache
from relu_sparsity.data.corpus import DEFAULT_CORPUS, default_corpus_files
from relu_sparsity.data.prepare import prepare

__all__ = ["DEFAULT_CORPUS", "TokenCache", "default_cache_dir", "default_corpus_files",
           "open_cache", "prepare"]
