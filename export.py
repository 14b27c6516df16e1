"""
A checkpoint as a Hugging Face model folder, the form the official BabyLM 2025 evaluation pipeline loads
(AutoModelForCausalLM for zero-shot scoring and reading, AutoModel for its fine-tuning, and
AutoModelForSequenceClassification, with AutoTokenizer and trust_remote_code=True; milestones as revisions
chck_<N>M). The pipeline's fine-tuning classifies from the last real token with --take_final (without
--causal; see results/pipeline/README.md).

    python export.py --ckpt=out/blalm/ckpt_best.pt --out=hf/blalm   # one checkpoint
    python export.py --run=out/blalm --out=hf/blalm                 # ckpt.pt, and each ckpt_<N>M_words.pt
                                                                    # into hf/blalm/chck_<N>M/
    python export.py --help

The folder holds config.json; the wrapper code of hf_code/ (configuration_blalm.py, modeling_blalm.py) with
blalm.py, decode.py, hedgehog.py, mlstm_triton.py and conv_triton.py copied beside it, so it runs without this repository;
model.safetensors (float32); tokenizer.json, tokenizer_config.json, special_tokens_map.json (the BPE
of the checkpoint as a byte-level BPE of the `tokenizers` library: the same ids as tiktoken's
encode_ordinary, with <|endoftext|> prepended as BOS when special tokens are added, as the pipeline does);
README.md. Writing needs neither transformers nor safetensors (used when installed); loading the folder needs
`pip install transformers safetensors tokenizers`. An existing non-empty --out is replaced only with
--overwrite=True, and only when it holds an earlier export and nothing else (never a run folder, never the
folder of the checkpoint exported); the folder is built beside it and renamed into place, so a failed export
leaves nothing, and what a killed one left beside it is removed by the next export.
"""

import ast
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch

from checkpoint import load, milestones, model_from_checkpoint, resolve_path
from common import (check_writable, parse_args, remove_stray_temps, run_cli, temp_prefix, write_atomic,
                    write_json)
from data import EOT, tokenizer_from_dict

ROOT = Path(__file__).resolve().parent
WRAPPER_DIR = ROOT / "hf_code"
WRAPPER_FILES = ("configuration_blalm.py", "modeling_blalm.py")
MODEL_FILES = ("blalm.py", "decode.py", "hedgehog.py", "mlstm_triton.py", "conv_triton.py")  # copied, imports made relative
AUTO_MAP = {"AutoConfig": "configuration_blalm.BLaLMHFConfig", "AutoModel": "modeling_blalm.BLaLMModel",
            "AutoModelForCausalLM": "modeling_blalm.BLaLMForCausalLM",
            "AutoModelForSequenceClassification": "modeling_blalm.BLaLMForSequenceClassification"}


@dataclass
class ExportConfig:
    ckpt: str = ""           # a checkpoint file (or a run folder: its ckpt.pt) -> --out
    run: str = ""            # a run folder: --final -> --out, each ckpt_<N>M_words.pt -> --out/chck_<N>M
    final: str = "ckpt.pt"   # with --run: the run's file that becomes the main revision (or ckpt_best.pt)
    out: str = ""            # the folder to write (required)
    overwrite: bool = False  # replace a non-empty --out

# -----------------------------------------------------------------------------
# The tokenizer: tiktoken's byte-level BPE as a `tokenizers` BPE model


def bytes_to_unicode():
    """GPT-2's table byte -> character: printable Latin-1 bytes stand for themselves, the other 68 bytes
    (controls, space, soft hyphen) for chr(256 + n). A byte-level BPE token is the string of its bytes'
    characters (b" the" -> "Ġthe")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table


def bpe_merges(ranks):
    """The merge list of tiktoken's ranks: for each token, the pair of tokens whose merge produces it, in rank
    order. tiktoken keeps no merges: a piece is split into bytes and the adjacent pair whose concatenation
    has the lowest rank merges first (the leftmost on ties). A part that ends up as token t never had a part
    crossing its edges, so the merges inside it are those of t's bytes alone: the pair that forms t is the
    last merge of the same procedure run on t's bytes. A token that procedure does not reach (it ends with
    more than one part) gets no merge: tiktoken emits it only for a piece that is exactly the token, which
    `tokenizers` does too with ignore_merges. Merges ordered by the rank they produce then make the two
    agree on every input."""
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda x: x[1]):
        parts = [token[j:j + 1] for j in range(len(token))]
        while len(parts) > 1:
            r, j = min((ranks.get(parts[j] + parts[j + 1], len(ranks)), j) for j in range(len(parts) - 1))
            if r == len(ranks):
                break  # no adjacent pair is a token
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
            parts[j:j + 2] = [parts[j] + parts[j + 1]]
    return merges


def tokenizer_files(enc, model_max_length=None):
    """-> {file name: JSON object}: tokenizer.json, tokenizer_config.json, special_tokens_map.json for the
    tiktoken Encoding enc. BOS = EOS = unk = pad = <|endoftext|>; the post-processor prepends BOS when special tokens
    are added (transformers' default), so the pipeline scores the first word given BOS, as eval.py does."""
    if EOT not in enc._special_tokens:
        raise ValueError(f"the tokenizer has no {EOT} token (special tokens: {sorted(enc._special_tokens)}); "
                         f"export needs it as BOS/EOS")
    eot = enc._special_tokens[EOT]
    char = bytes_to_unicode()
    text = lambda b: "".join(char[x] for x in b)
    ranks = enc._mergeable_ranks
    vocab = {text(t): r for t, r in sorted(ranks.items(), key=lambda x: x[1])}
    special = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                "special": True} for s, i in sorted(enc._special_tokens.items(), key=lambda x: x[1])]
    bos = {"SpecialToken": {"id": EOT, "type_id": 0}}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": special, "normalizer": None,
        # tiktoken's split pattern, then bytes -> characters (ByteLevel without its own GPT-2 regex)
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {EOT: {"id": EOT, "ids": [eot], "tokens": [EOT]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,  # a piece that is a token is that token, as in tiktoken
                  "vocab": vocab,
                  # "a b" strings: byte-level token strings hold no space, and every tokenizers version reads them
                  "merges": [f"{text(a)} {text(b)}" for a, b in bpe_merges(ranks)]},
    }
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "pad_token": EOT,  # padding=True (the pipeline's fine-tuning) needs one; right padding, masked
              "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "split_special_tokens": True,  # "<|endoftext|>" inside a text is text, as in encode_ordinary
              "padding_side": "right",
              "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in special}}
    if model_max_length:
        config["model_max_length"] = model_max_length
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": config,
            "special_tokens_map.json": {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}}

# -----------------------------------------------------------------------------
# Weights: safetensors

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(tensors, path, metadata=None):
    """The safetensors format, for when the package is missing: an 8-byte little-endian header length N, N
    bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} (offsets
    into the data that follows; the header padded with spaces to a multiple of 8), then each tensor's bytes,
    C order, little-endian, one after the other."""
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors writes the machine's byte order, which is not little-endian here")
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} has no safetensors name")
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)

    def write(f):
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    write_atomic(path, write)


def save_safetensors(tensors, path, metadata):
    try:  # optional: the package when installed, else the writer above
        from safetensors.torch import save
    except ImportError:
        return write_safetensors(tensors, path, metadata)
    write_atomic(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))

# -----------------------------------------------------------------------------
# The folder


def model_code():
    """-> {file name: source} of the folder's code. transformers imports the folder's files as a package, and
    copies into its modules cache only the files that a wrapper imports relatively (>= 5: and what those import
    relatively; < 5, from a local folder: not). So the copies of MODEL_FILES import each other as
    `from .hedgehog import ...`, and each wrapper names every such file itself. Anything that would break the
    folder (a file not named, an import of another project file) is an error here, not on the user's machine."""
    stems = [Path(n).stem for n in MODEL_FILES]
    project = {p.stem for p in ROOT.glob("*.py")}
    pattern = re.compile(rf"^(\s*)from ({'|'.join(stems)}) import", re.M)
    code = {n: (WRAPPER_DIR / n).read_text(encoding="utf-8") for n in WRAPPER_FILES}
    for name in MODEL_FILES:
        code[name] = pattern.sub(r"\1from .\2 import", (ROOT / name).read_text(encoding="utf-8"))
    relative = lambda src: set(re.findall(r"^\s*from \.(\w+) import", src, re.M))
    needed = set().union(*(relative(code[n]) for n in MODEL_FILES))
    for name in WRAPPER_FILES:  # transformers < 5 copies from a local folder only what a wrapper names itself
        if needed - relative(code[name]):
            raise RuntimeError(f"hf_code/{name} does not name {sorted(needed - relative(code[name]))}, which "
                               f"blalm.py needs: add them to its TYPE_CHECKING imports")
    for name, src in code.items():
        for node in ast.walk(ast.parse(src)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            bad = [m for m in mods if m.split(".")[0] in project]
            if bad:
                raise RuntimeError(f"{name} imports {bad}, a project file the exported folder does not hold; "
                                   f"add it to export.MODEL_FILES")
    return code


def hf_config(config, eot):
    """config.json: transformers' keys and the BLaLMConfig fields, flat."""
    return {"architectures": ["BLaLMForCausalLM"], "model_type": "blalm", "auto_map": AUTO_MAP,
            **config.to_dict(), "hidden_size": config.n_embd, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "bos_token_id": eot, "eos_token_id": eot, "tie_word_embeddings": True,
            "torch_dtype": "float32"}


def export_checkpoint(path, out):
    """Write the model folder of checkpoint `path` into the existing empty folder `out`."""
    ckpt = load(path)
    model = model_from_checkpoint(ckpt, path)
    config = model.config
    enc = tokenizer_from_dict(ckpt["tokenizer"])
    if enc.n_vocab > config.vocab_size:
        raise ValueError(f"checkpoint {path}: its tokenizer has {enc.n_vocab} tokens, more than the model's "
                         f"vocab_size={config.vocab_size}")
    if model.lm_head.weight is not model.transformer.wte.weight:
        raise ValueError(f"checkpoint {path}: lm_head is not tied to the embeddings; export stores them as one")
    weights = {"blalm." + k: v.float() if v.is_floating_point() else v
               for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_safetensors(weights, out / "model.safetensors", {"format": "pt"})
    write_json(hf_config(config, enc._special_tokens[EOT]), out / "config.json")
    learned_pos = config.mixer in ("attn", "hedgehog")
    for name, obj in tokenizer_files(enc, config.block_size if learned_pos else None).items():
        write_json(obj, out / name)
    for name, src in model_code().items():
        write_atomic(out / name, src)
    words = ckpt.get("words_seen")
    write_atomic(out / "README.md", (
        f"# BLaLM ({config.mixer}, {config.n_layer} layers, n_embd {config.n_embd})\n\n"
        f"Exported by export.py from {Path(path).name}: iteration {ckpt.get('iter')}, "
        f"{f'{words:,.0f}' if words is not None else 'unknown'} words seen.\n\n"
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)\n"
        "tokenizer = AutoTokenizer.from_pretrained(PATH)  # prepends <|endoftext|> as BOS\n```\n\n"
        "forward(input_ids, attention_mask=None, labels=None) returns logits (and the loss of labels); "
        "pad on the right. AutoModel gives the base model (last_hidden_state; hidden_states with "
        "output_hidden_states=True; padded positions repeat the last real token's state), "
        "AutoModelForSequenceClassification a linear head on the last real token.\n"))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EXPORT_FILES = frozenset(("config.json", "model.safetensors", "README.md", *TOKENIZER_FILES, *WRAPPER_FILES,
                          *MODEL_FILES))
REVISION = re.compile(r"chck_\d+M")


def not_an_export(folder):
    """-> the entries of `folder` (paths relative to it) that an export does not write: a folder is an earlier
    export when its config.json says model_type "blalm" and it holds only the export's files, __pycache__
    and chck_<N>M folders of the same kind. [] means it may be replaced."""
    folder, foreign = Path(folder), []
    try:
        is_blalm = json.loads((folder / "config.json").read_text()).get("model_type") == "blalm"
    except (OSError, ValueError, AttributeError):
        is_blalm = False
    for p in sorted(folder.iterdir()):
        if p.is_symlink() or not (p.is_file() and p.name in EXPORT_FILES or p.is_dir() and
                                  (p.name == "__pycache__" or REVISION.fullmatch(p.name))):
            foreign.append(p.name)
        elif p.is_dir() and p.name != "__pycache__":
            foreign += [f"{p.name}/{q}" for q in not_an_export(p)]
    if foreign or is_blalm:
        return foreign
    return ["config.json (not a BLaLM export's)" if (folder / "config.json").exists() else "no config.json"]


def check_out(out, overwrite, sources=()):
    """--out may be new or empty; a non-empty one only with --overwrite, and only when it holds an earlier
    export and nothing else (never a run folder's checkpoints and logs), and never when it holds one of
    the checkpoints to export (`sources`). Checked before any work."""
    out = Path(os.path.abspath(out))
    inside = [str(s) for s in sources if out in Path(os.path.abspath(s)).parents]
    if inside:
        raise ValueError(f"--out={out} holds the checkpoint to export ({', '.join(inside)}); "
                         f"choose an --out outside it")
    if "." in out.name:  # transformers < 5 imports the folder's code as a module named after the folder
        raise ValueError(f"--out={out}: the folder name {out.name!r} has a '.', which transformers < 5 cannot "
                         f"import trust_remote_code from; choose a name without dots")
    check_writable(out, "--out", folder=True, make_parents=True)  # hf/ of `--out=hf/blalm` is made in a fresh clone
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out={out} is not empty; give --overwrite=True to replace it, or another --out")
    if out.is_dir() and any(out.iterdir()) and (foreign := not_an_export(out)):
        raise ValueError(f"--out={out} is not an earlier export (it holds {', '.join(foreign[:5])}"
                         f"{' ...' if len(foreign) > 5 else ''}); --overwrite replaces only an export of "
                         f"export.py or an empty folder: choose another --out")
    return out


LEGACY_TEMP = re.compile(r"(.+)\.(tmp|old)-[0-9a-f]{8}")  # the names before temp_prefix: no pid to test


def remove_stale_temps(out):
    """Remove what killed exports to `out` left beside it: temporary folders named by common.temp_prefix whose
    process is dead (remove_stray_temps), and the older <out>.tmp-<hex> / <out>.old-<hex> names of this
    script (no process to ask: an export of the same name writing at this very moment would lose its
    temporary folder and fail cleanly) -> the paths removed."""
    removed = remove_stray_temps(out.parent, out.name)
    for p in out.parent.iterdir():
        m = LEGACY_TEMP.fullmatch(p.name)
        if m and m[1] == out.name and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def write_folder(out, build):
    """build(tmp) into a new folder beside out, then renamed to out (an old out is moved aside first and
    removed after): a failed build leaves out as it was. Temporary names carry host and pid
    (common.temp_prefix), so a later export removes what a killed one left."""
    for p in remove_stale_temps(out):
        print(f"removed {p}, left by an earlier export that did not finish")
    tmp = out.with_name(f"{temp_prefix(out.name)}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        old = None
        if out.exists():
            old = out.with_name(f"{temp_prefix(out.name)}old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv):
    cfg = parse_args(argv, ExportConfig, doc=__doc__)
    if bool(cfg.ckpt) == bool(cfg.run):
        raise ValueError("give one of --ckpt=PATH (a checkpoint) or --run=DIR (a run folder with its milestones)")
    if not cfg.out:
        raise ValueError("--out=DIR is required (the folder to write)")
    if cfg.run:
        if not os.path.isdir(cfg.run):
            raise FileNotFoundError(f"--run={cfg.run} is not a folder; expected a run folder written by train.py")
        main_ckpt = resolve_path(os.path.join(cfg.run, cfg.final))
        marks = milestones(cfg.run)
    else:
        main_ckpt, marks = resolve_path(cfg.ckpt), []
    out = check_out(cfg.out, cfg.overwrite, [main_ckpt] + [p for _, p in marks])

    def build(tmp):
        export_checkpoint(main_ckpt, tmp)
        for n, path in marks:
            (tmp / f"chck_{n}M").mkdir()
            export_checkpoint(path, tmp / f"chck_{n}M")
            print(f"  {path} -> {out / f'chck_{n}M'}")
    write_folder(out, build)
    print(f"wrote {out} from {main_ckpt}" + (f", and {len(marks)} milestone folders chck_<N>M inside" if marks else ""))
    if cfg.run:
        print("to push them as revisions of a Hugging Face model repository REPO (after `huggingface-cli login`):")
        print(f"  huggingface-cli upload REPO {out} . --exclude 'chck_*/*'")
        for n, _ in marks:
            print(f"  huggingface-cli upload REPO {out / f'chck_{n}M'} . --revision chck_{n}M")
        if not marks:
            print(f"  (no ckpt_<N>M_words.pt in {cfg.run}: only the main revision)")
    return out


if __name__ == "__main__":
    run_cli(main)
