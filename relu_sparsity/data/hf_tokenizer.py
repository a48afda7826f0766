"""A Hugging Face checkpoint's own tokenizer (`tokenizer.json`, read by the `tokenizers`
library), so that a token cache holds the tokens the checkpoint was trained on
(`prepare --hf-tokenizer HF_DIR`). It offers the few methods of SentencePiece's processor that
writing and reading a cache use (`encode`, `decode`, `eos_id`, `get_piece_size`).

The end-of-document id, which joins documents in the cache, is the checkpoint's eos token:
`eos_token_id` of config.json (or generation_config.json), else `eos_token` of
tokenizer_config.json. The vocabulary size is the model's (`vocab_size` of config.json, which
may exceed the tokenizer's: OPT pads its embedding table), so the cache's ids fit its
embeddings."""

import hashlib
import json
from pathlib import Path

TOKENIZER_FILE = "tokenizer.json"


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise ValueError(f"{path} is not JSON: {err}") from None
    return value if isinstance(value, dict) else {}


class HfTokenizer:
    """The tokenizer of a checkpoint folder; a token cache's (which keeps tokenizer.json alone)
    with the `eos` and `vocab` its meta.json records."""

    def __init__(self, folder: str | Path, *, eos: int | None = None, vocab: int | None = None):
        from tokenizers import Tokenizer

        folder = Path(folder)
        if not (folder / TOKENIZER_FILE).is_file():
            raise FileNotFoundError(f"{folder} has no {TOKENIZER_FILE} (the `tokenizers` "
                                    "library's file, which a fast tokenizer's save_pretrained "
                                    "writes)")
        self.file = folder / TOKENIZER_FILE
        self.tokenizer = Tokenizer.from_file(str(self.file))
        self.eos = eos_id(folder, self.tokenizer) if eos is None else eos
        model_vocab = read_json(folder / "config.json").get("vocab_size") if vocab is None \
            else vocab
        own = self.tokenizer.get_vocab_size(with_added_tokens=True)
        self.vocab = max(own, model_vocab) if isinstance(model_vocab, int) else own

    def encode(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """Each text's ids, without special tokens (documents are joined by eos alone);
        `tokenizers` spreads a batch over its own threads."""
        del num_threads
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def eos_id(self) -> int:
        return self.eos

    def get_piece_size(self) -> int:
        return self.vocab

    def fingerprint(self) -> str:
        """What the cache's tokens depend on: the tokenizer file, the eos id, the vocabulary."""
        digest = hashlib.sha256(self.file.read_bytes())
        digest.update(f"{self.eos} {self.vocab}".encode())
        return digest.hexdigest()


def eos_id(folder: Path, tokenizer) -> int:
    for name in ("config.json", "generation_config.json"):
        value = read_json(folder / name).get("eos_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    token = read_json(folder / "tokenizer_config.json").get("eos_token")
    if isinstance(token, dict):  # an AddedToken saved whole
        token = token.get("content")
    if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
        return tokenizer.token_to_id(token)
    raise ValueError(f"{folder}: no end-of-document token (eos_token_id in config.json or "
                     "generation_config.json, eos_token in tokenizer_config.json)")
