"""Builds the small local tokenizer that inference-perf uses here (bench/inference-perf/tokenizer/).

inference-perf needs a Hugging Face tokenizer to generate prompts of a given length in tokens and
to count output tokens. Nothing may come from a model hub, so this script makes one from nothing:

1. It writes deterministic English-like text (a fixed seed): common English function words,
   the words the fleetpick simulator "generates" (crates/sim/src/server.rs, one word per token), and a
   few thousand invented words built from syllables, in sentences with capitals, punctuation,
   numbers and paragraphs, with Zipf-like word frequencies.
2. It trains a byte-level BPE tokenizer (the scheme of GPT-2 and Llama 3) with the `tokenizers`
   library on that text. The alphabet is the printable ASCII bytes plus tab and newline; any
   other byte becomes <unk>, so random token ids always decode to clean ASCII.
3. It wraps it in transformers' PreTrainedTokenizerFast with Llama-3-like special tokens (a BOS
   added to every encoded sequence, a chat template) and saves it with save_pretrained, so that
   AutoTokenizer.from_pretrained(<dir>) loads it offline (HF_HUB_OFFLINE=1).

Run with the venv made by install.sh (it has `tokenizers` and `transformers`):

    bench/inference-perf/.venv/bin/python bench/inference-perf/make_tokenizer.py [--check] [OUT_DIR]

OUT_DIR defaults to bench/inference-perf/tokenizer. With --check it only loads and checks an
existing directory. The output is deterministic for a given
`tokenizers` version; the checked-in files were made with the versions in constraints.txt.
"""

import itertools
import json
import os
import random
import sys

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

SEED = 20240611
VOCAB_SIZE = 4096
CORPUS_WORDS = 600_000

BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
SPECIAL = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<unk>"]

# A Llama-3-shaped chat template (only used by inference-perf's data.use_chat_template option).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

FUNCTION_WORDS = (
    "the of and to a in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there been one all we their has would when if so no will "
    "more can who its than other some time out into only up do any about may these could them "
    "first then two new also after over most where what such many before must well through very "
    "between each under while because both might should here how our just those same during "
    "without again against never often every still always another whether since though yet"
).split()

# The simulator's output words (crates/sim/src/server.rs WORDS): frequent here so that each one is a
# single token, and inference-perf's count of streamed output tokens matches the server's.
SIM_WORDS = (
    "the model server token cache request cluster region latency batch prefix queue picker envoy "
    "route fleet of and to in is for with on fast warm block load busy idle near far"
).split()

DOMAIN_WORDS = (
    "system user prompt answer question data time value result process service network memory "
    "report table number people water world city market energy policy history music language "
    "rate level group point state field order power light line house school night story"
).split()

ONSETS = "b c d f g h j k l m n p r s t v w y z bl br ch cl cr dr fl fr gl gr pl pr sh sk sl sp st str th tr wh".split()
NUCLEI = "a e i o u a e i o ai ea ee ie oa oo ou".split()
CODAS = ["", "", "", "n", "r", "s", "t", "l", "m", "d", "ng", "st", "nt", "ck", "sh", "th", "rd", "ld"]
SUFFIXES = ["", "", "", "", "s", "ed", "ing", "er", "ly", "tion", "ment", "ness", "al", "ive"]


def invented_words(rng: random.Random, n: int) -> list[str]:
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
        w = "".join(rng.choice(ONSETS) + rng.choice(NUCLEI) + rng.choice(CODAS) for _ in range(syllables))
        words.add(w + rng.choice(SUFFIXES))
    return sorted(words)


def corpus(rng: random.Random) -> list[str]:
    """Paragraphs of English-like text, `CORPUS_WORDS` words in all."""
    content = DOMAIN_WORDS + invented_words(rng, 6000)
    rng.shuffle(content)
    # Zipf-like weights: the k-th content word has weight 1/(k+10).
    cum_weights = list(itertools.accumulate(1.0 / (k + 10) for k in range(len(content))))

    def word() -> str:
        r = rng.random()
        if r < 0.40:
            return rng.choice(FUNCTION_WORDS)
        if r < 0.50:
            return rng.choice(SIM_WORDS)
        if r < 0.51:
            return str(rng.choice([rng.randint(0, 99), rng.randint(100, 9999), 2024]))
        return rng.choices(content, cum_weights=cum_weights)[0]

    paragraphs: list[str] = []
    total = 0
    while total < CORPUS_WORDS:
        sentences = []
        for _ in range(rng.randint(2, 7)):
            n = rng.randint(4, 22)
            ws = [word() for _ in range(n)]
            for i in range(1, n - 1):
                if rng.random() < 0.06:
                    ws[i] += ","
            if rng.random() < 0.05:
                ws[rng.randrange(n)] = '"' + ws[rng.randrange(n)] + '"'
            ws[0] = ws[0][:1].upper() + ws[0][1:]
            sentences.append(" ".join(ws) + rng.choice([".", ".", ".", ".", "?", "!", ":", ";"]))
            total += n
        paragraphs.append(" ".join(sentences))
    return paragraphs


def build() -> Tokenizer:
    rng = random.Random(SEED)
    text = corpus(rng)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # The byte-level characters of printable ASCII, tab and newline (not all 256 bytes).
    ascii_alphabet = [
        tok.pre_tokenizer.pre_tokenize_str(chr(b))[0][0] for b in list(range(32, 127)) + [9, 10]
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL,
        initial_alphabet=ascii_alphabet,
        limit_alphabet=len(ascii_alphabet),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer, length=len(text))
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    return tok


def check(path: str) -> None:
    """Loads the saved directory as inference-perf does (AutoTokenizer, offline) and checks it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    assert tok.vocab_size == VOCAB_SIZE, tok.vocab_size
    ids = tok("The fleet picker routes a request.").input_ids
    assert ids[0] == tok.bos_token_id, "every sequence starts with the BOS token"
    assert tok.decode(ids, skip_special_tokens=True) == "The fleet picker routes a request."
    multi = [w for w in SIM_WORDS if len(tok(" " + w, add_special_tokens=False).input_ids) != 1]
    assert not multi, f"simulator words that are not one token: {multi}"
    # What inference-perf's synthetic generators send: random non-special token ids, decoded.
    rng = random.Random(1)
    special = set(tok.all_special_ids)
    pool = [i for i in range(tok.vocab_size) if i not in special]
    sample = [rng.choice(pool) for _ in range(20000)]
    text = tok.decode(sample, skip_special_tokens=True)
    assert text.isascii()
    print(
        f"checked {path}: loads offline, BOS added, sim words are single tokens; random-token text"
        f" has {len(text.encode()) / len(sample):.2f} bytes per token"
    )


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    args = sys.argv[1:]
    check_only = "--check" in args
    args = [a for a in args if a != "--check"]
    out = args[0] if args else os.path.join(here, "tokenizer")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if check_only:
        check(out)
        return
    from transformers import PreTrainedTokenizerFast

    tok = build()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token="<unk>",
        pad_token=EOS,
        model_max_length=131072,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    os.makedirs(out, exist_ok=True)
    fast.save_pretrained(out)
    # Compact JSON: the file is checked in, and indentation alone would double its size.
    path = os.path.join(out, "tokenizer.json")
    with open(path) as f:
        data = json.load(f)
    with open(path, "w") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
    # transformers 5 names the class TokenizersBackend; PreTrainedTokenizerFast is its alias there
    # and the class transformers 4 knows, so the directory loads with either.
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        config = json.load(f)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    sizes = {name: os.path.getsize(os.path.join(out, name)) for name in sorted(os.listdir(out))}
    print(f"wrote {out}: vocab {tok.get_vocab_size()}, files {sizes}")
    check(out)


if __name__ == "__main__":
    main()
