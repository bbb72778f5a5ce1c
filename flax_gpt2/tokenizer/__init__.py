"""GPT-2's tokenizer: the `Tokenizer` (tiktoken's byte-level BPE), the BPE file formats (`vocab.json` +
`merges.txt`, `encoder.json` + `vocab.bpe`) and where a tokenizer comes from (a folder, the hub, tiktoken's
cache, the copy shipped in `flax_gpt2/assets`)."""

from flax_gpt2.tokenizer.bpe_tokenizer import ENDOFTEXT, USER_TEXT_SPECIAL, Tokenizer, get_tokenizer

__all__ = ["ENDOFTEXT", "USER_TEXT_SPECIAL", "Tokenizer", "get_tokenizer"]
