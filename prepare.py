"""
Prepare a corpus for training: curate it, train a byte-level BPE tokenizer, write the token bins
(corpus.prepare). The output folder holds train.bin, val.bin, tokenizer.tiktoken, meta.json, report.md and
readability.png; train.py --data=FOLDER trains on it.

    python prepare.py                                                   # the synthetic corpus -> data_prepared/synthetic
    python prepare.py --source=path/to/corpus --budget_words=10000000   # -> data_prepared/corpus
    python prepare.py --source=path/to/babylm/train_10M,path/to/babylm/dev --out=data_prepared/strict_small

A source is a folder of .txt/.txt.gz files (the source of a file is its top-level sub-folder), the BabyLM
release layout (<source>.train / .dev; .test files are never read), a text file, several of these joined
by commas, or "synthetic". Preparing into a folder that holds an earlier preparation replaces it.
"""

from dataclasses import asdict, dataclass

from common import parse_args, run_cli
from corpus import DEFAULT_EXCLUDE, default_out_dir, prepare


@dataclass
class DataConfig:
    source: str = "synthetic"  # folder of .txt/.txt.gz, BabyLM folder, text file, comma-joined paths, or "synthetic"
    out: str = ""  # output folder; default data_prepared/<source folder name>
    budget_words: int = 0  # training words (whitespace-separated); 0 = everything
    vocab_size: int = 0  # BPE vocabulary incl. <|endoftext|>; 0 = 16384 (1024 for synthetic)
    val_fraction: float = 0.01  # share of the selected words held out for validation (whole documents)
    curriculum: bool = False  # order the training stream easy to hard by readability
    sources: str = ""  # "name[:weight],...": sources to use and their shares; default all but `exclude`
    exclude: str = DEFAULT_EXCLUDE  # sources or single files ("source/stem") to leave out, unless named in `sources`
    seed: int = 1337
    tokenizer: str = "bpe"  # "bpe" (trained here) or "gpt2" (tiktoken's, needs its files once)
    doc_words: int = 1000  # documents are packed from consecutive blocks up to this many words
    min_doc_words: int = 10  # shorter documents are dropped
    synthetic_words: int = 1_000_000  # synthetic corpus size when budget_words is 0
    pairs_per_phenomenon: int = 1000  # synthetic minimal pairs per phenomenon
    sentence_case: bool = False  # capitalise a line that starts a sentence (CHILDES utterances are lower-case)
    strict_utf8: bool = False  # refuse a file that is not valid UTF-8 (else: a warning, its bad bytes read as U+FFFD)


def main(argv):
    cfg = parse_args(argv, DataConfig, doc=__doc__)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("source", "out")}
    prepare(cfg.source, cfg.out or default_out_dir(cfg.source), **settings)


if __name__ == "__main__":
    run_cli(main)
