"""A small CLIP BPE tokenizer trained on the world's captions.

`train_merges(texts)` learns byte-level BPE merges with the `tokenizers`
library, normalizing and splitting text exactly as CLIP does (NFC,
whitespace collapsed, lower case, CLIP's word regex, bytes mapped to
printable characters, "</w>" closing every word). `write_tokenizer(folder,
merges)` writes what `transformers.CLIPTokenizer.from_pretrained` reads:

* vocab.json in the order of OpenAI's `simple_tokenizer`: the 256 byte
  symbols, the same with "</w>", one symbol per merge in merge order, then
  <|startoftext|> and <|endoftext|> (the two largest ids, which the CLIP
  port's pooling and `prompt_learners.prompt_length` rely on);
* merges.txt ("#version: 0.2" and one merge per line, by rank);
* tokenizer_config.json and special_tokens_map.json (max length 77,
  <|endoftext|> as the unknown and padding token, as in
  openai/clip-vit-base-patch16).

Building the vocabulary ourselves (instead of saving the trainer's) keeps
every byte and every byte + "</w>" in it, so no text ever maps to the
unknown token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
END_OF_WORD = "</w>"
# CLIP's word splitting (simple_tokenizer.py), as transformers' converter
# writes it for the fast CLIP tokenizer.
WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CONTEXT_LENGTH = 77


def byte_symbols() -> list[str]:
  """The 256 printable stand-ins for bytes, in byte order (GPT-2's map)."""
  printable = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("\xa1"), ord("\xac") + 1))
    + list(range(ord("\xae"), ord("\xff") + 1))
  )
  out, extra = [], 0
  for b in range(256):
    if b in printable:
      out.append(chr(b))
    else:
      out.append(chr(256 + extra))
      extra += 1
  return out


def _clip_pipeline(model):
  """A `tokenizers.Tokenizer` around `model` with CLIP's text handling."""
  from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers

  tok = Tokenizer(model)
  tok.normalizer = normalizers.Sequence(
    [
      normalizers.NFC(),
      normalizers.Replace(Regex(r"\s+"), " "),
      normalizers.Lowercase(),
    ]
  )
  tok.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(
        Regex(WORD_PATTERN), behavior="removed", invert=True
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
  )
  return tok


def train_merges(
  texts: Iterable[str], num_merges: int
) -> list[tuple[str, str]]:
  """Learns up to `num_merges` BPE merges on `texts`, by rank.

  Deterministic: the trainer counts pairs over the whole corpus and breaks
  ties by symbol order.
  """
  from tokenizers import models, trainers

  tok = _clip_pipeline(
    models.BPE(end_of_word_suffix=END_OF_WORD, unk_token=None)
  )
  symbols = byte_symbols()
  trainer = trainers.BpeTrainer(
    # The trainer counts its alphabet in the vocabulary size.
    vocab_size=2 * len(symbols) + num_merges,
    min_frequency=2,
    special_tokens=[],
    initial_alphabet=symbols,
    end_of_word_suffix=END_OF_WORD,
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer=trainer)
  merges = json.loads(tok.to_str())["model"]["merges"]
  out = []
  for m in merges[:num_merges]:
    a, b = m if isinstance(m, list) else m.split(" ")
    out.append((a, b))
  return out


def vocabulary(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
  """CLIP's vocabulary order: bytes, bytes + </w>, merges, SOT, EOT."""
  symbols = byte_symbols()
  tokens = symbols + [s + END_OF_WORD for s in symbols]
  seen = set(tokens)
  for a, b in merges:
    if a + b not in seen:  # the trainer never repeats one; be safe anyway
      tokens.append(a + b)
      seen.add(a + b)
  tokens += [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}


def write_tokenizer(folder: str, merges: Sequence[tuple[str, str]]) -> dict:
  """Writes vocab.json, merges.txt and the tokenizer configs; the vocab."""
  vocab = vocabulary(merges)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    f.writelines(f"{a} {b}\n" for a, b in merges)
  special = {
    "bos_token": SOT,
    "eos_token": EOT,
    "unk_token": EOT,
    "pad_token": EOT,
  }
  config = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": CONTEXT_LENGTH,
    "do_lower_case": True,
    "errors": "replace",
    **special,
  }
  for name, obj in (
    ("tokenizer_config.json", config),
    ("special_tokens_map.json", special),
  ):
    with open(os.path.join(folder, name), "w") as f:
      json.dump(obj, f, indent=2)
  return vocab


def encode(merges: Sequence[tuple[str, str]], text: str) -> list[int]:
  """Token ids of `text` (no SOT/EOT) with the `tokenizers` BPE itself.

  The reference that `CLIPTokenizer` is checked against in the tests.
  """
  from tokenizers import models

  vocab = vocabulary(merges)
  bpe = models.BPE(
    vocab=vocab,
    merges=list(merges),
    end_of_word_suffix=END_OF_WORD,
    unk_token=EOT,
  )
  return _clip_pipeline(bpe).encode(text).ids
