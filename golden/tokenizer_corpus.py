"""The tokenizer parity corpus: deterministic strings that stress a byte-level BPE tokenizer, in case groups.

Built in code (no data file): the walk-through's published facts, many scripts, code, emoji sequences
(ZWJ, skin tones, flags, keycaps), combining marks in NFC and NFD, numbers of every length, whitespace
runs, contractions in any case, punctuation runs, special-token text (plain text for the contract of
`python -m golden check-tokenizer`), control characters, and random mixtures of all of those.
`groups()` and `corpus()` return the same strings on every call and every machine.

The expected Llama 3 ids of every string are committed in golden/data/tokenizer/llama3.json, written by
`python -m golden record-tokenizer` with Hugging Face `tokenizers` (golden.tokenizer_check.record_expected).
"""

from __future__ import annotations

import itertools
import random
import unicodedata

# The walk-through's published facts, as ids without BOS; the goldens' manifests hold the same tokens
# after 128000 (tests/test_tokenizer_check.py checks both).
PUBLISHED = {
    # the walk-through's prompt (golden/data/tiny): 17 tokens with BOS, the last one a lone space
    "the answer to the ultimate question of life, the universe, and everything is ":
        [1820, 4320, 311, 279, 17139, 3488, 315, 2324, 11, 279, 15861, 11, 323, 4395, 374, 220],
    "42": [2983],  # the walk-through decodes the model's answer 2983 as "42"
    "This is a test sentence.": [2028, 374, 264, 1296, 11914, 13],  # Meta's test_encode
    "user": [882],  # Meta's test_encode_message: the role between the header tokens
    "<|eot_id|>": [27, 91, 68, 354, 851, 91, 29],  # special-token text as plain text: "<", "|", "e", "ot", "_id", ...
    "The capital of France is": [791, 6864, 315, 9822, 374],  # golden/data/tiny-tied's prompt
    # golden/data/tiny-varied's prompt
    "The quick brown fox jumps over the lazy dog.": [791, 4062, 14198, 39935, 35308, 927, 279, 16053, 5679, 13],
}

SCRIPTS = {
    "latin": "The quick brown fox jumps over the lazy dog. Größe, façade, naïve, smørrebrød, Łódź, İstanbul.",
    "cyrillic": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёжик в тумане.",
    "greek": "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε, ΑΒΓΔ αβγδ ς.",
    "arabic": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق. ١٢٣ ٤٥٦",
    "hebrew": "דג סקרן שט בים מאוכזב ולפתע מצא חברה. שָׁלוֹם עוֹלָם",
    "devanagari": "ऋषियों को सताने वाले दुष्ट राक्षसों के राजा रावण का सर्वनाश करने वाले विष्णुवतार भगवान श्रीराम। १२३",
    "cjk": "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。東京都は日本の首都です。ひらがなカタカナ。",
    "thai": "เป็นมนุษย์สุดประเสริฐเลิศคุณค่า กว่าบรรดาฝูงสัตว์เดรัจฉาน ๑๒๓",
    "korean": "다람쥐 헌 쳇바퀴에 타고파. 안녕하세요 세계! ㄱㄴㄷ",
    "misc": "Ուրախ եմ ծանոթանալ. ქართული ენა. አማርኛ ቋንቋ. ᚠᚢᚦᚨᚱᚲ. 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛",
}

CODE = [
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "if __name__ == '__main__':\n    main()\n",
    "const x = () => { return `${a}-${b}`; };",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    "<div class=\"row\"><span>&nbsp;</span></div>",
    "$ ls -la | grep '.py' && echo \"done\" >> /tmp/log.txt",
    "fn main() -> Result<(), Box<dyn Error>> { Ok(()) }",
    "{\"key\": [1, 2.5, -3e10, true, null], \"k2\": {\"a\": \"b\"}}",
    "#include <stdio.h>\nint main(void){printf(\"%d\\n\", 42);}",
    "x=[i**2 for i in range(10) if i%2==0]",
    "    \n        \n\t\t\n",
    "```python\nprint('hi')\n```",
    "a_b_c __init__ CamelCase snake_case kebab-case SCREAMING_CASE",
    "http://example.com/path?q=1&r=2#frag https://foo.bar/~baz",
]

EMOJI = [
    "😀", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵🇺🇸🇫🇷", "❤️", "✋🏿✋🏻", "🧑🏾‍🚀", "🫠",
    "1️⃣", "#️⃣", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "☕️ and 🍰", "hi😀there", "😀😀😀", " 🙂 ", "emoji: 🎉🎊🥳!",
]

ACCENTED = ["café", "naïve", "Ångström", "Crème brûlée", "Việt Nam", "Ελληνικά", "ñandú", "Zoë Saldaña",
            "mañana", "résumé", "São Paulo", "Dvořák", "ḱṓḿ", "e\u0301\u0302\u0303", "ǅemal"]

CONTRACTIONS = ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]

PUNCT = ["...", "?!", "!!!", "---", "—", "–", "«»", "“quoted”", "‘single’", "(((", ")))", "[]{}", "::", ";;",
         "@#$%^&*", "~~~", "|||", "\\\\", "//", "<<>>", "''", '""', "¿¡", "…", "•", "§¶", "©®™", "°C", "±×÷"]

WHITESPACE = [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", "\r\n", "\r\n\r\n", "\r", " \n", "\n ",
              " \t \n", "\u00a0", "\u2003", "\u3000", "\v", "\f", "\u2028", "\u200b"]

WORDS = ["hello", "world", "Llama", "token", "the", "a", "I", "it", "don", "won", "THEY", "We", "you", "x",
         "42", "3.14", "über", "привет", "世界", "مرحبا", "नमस्ते", "안녕", "ไทย", "γειά"]

# Special-token text. The check-tokenizer contract reads it as plain text; the parity tests of impl also read it
# as specials (allow_special=True). Llama 3's named specials, two reserved ones, and other vocabularies' specials.
SPECIAL_TEXTS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|finetune_right_pad_id|>",
                 "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                 "<|python_tag|>", "<|image|>", "<|reserved_special_token_245|>",
                 "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _numbers(rng: random.Random) -> list[str]:
    # Llama 3 splits digit runs in groups of 3: every length from 1 to 10, alone and after a space and a letter.
    out = [run for n in range(1, 11) for run in ("1234567890"[:n], f" {'9876543210'[:n]}", f"v{'5' * n}")]
    for n in range(1, 21):
        digits = "".join(rng.choice("0123456789") for _ in range(n))
        out += [digits, f" {digits}", f"x{digits}y", f"{digits}.", f"  {digits}", f"\n{digits}"]
    out += ["1,000", "1,000,000", "12,345.678", "1.000.000,00", "1 000 000", "1'000'000", "3.14159",
            "-42", "+7", "1e-10", "0x1F", "0b1010", "2024-01-31", "12:30:45", "99%", "$1,299.99", "€5",
            "١٢٣٤٥", "१२३४५", "一二三", "Ⅻ", "½", "²³", "①②③", "٣.١٤", "10⁶", "v1.2.3", "192.168.0.1"]
    return out


def _contractions() -> list[str]:
    out = []
    for c in CONTRACTIONS:
        # dict, not set: a set's order of strings changes with PYTHONHASHSEED, and the corpus order must not
        for variant in dict.fromkeys([c, c.upper(), c.title(), c[:2] + c[2:].upper(), c[:1] + c[1:].swapcase()]):
            # then letters: Llama 3's (?i:'s|...) ends the piece after the contraction, in any case
            out += [f"it{variant}", f"IT{variant} here", f"{variant}", f" {variant}", f"x{variant}{variant}",
                    f"’{variant[1:]}", f"{variant}x", f"WE{variant}ARE", f"{variant}elf"]
    out += ["don't", "DON'T", "Don'T", "we'Re", "they'LL", "I'M", "you'VE", "she'D", "rock 'n' roll", "''s",
            "'''", "'s's", "o'clock", "l'homme", "'S'T'RE", "IT'SELF", "DON'TS", "O'NEILL", "Y'ALL'D'VE"]
    return out


def _whitespace(rng: random.Random) -> list[str]:
    out = list(WHITESPACE)
    for a, b in itertools.product(WHITESPACE[:10], ["a", "1", ".", "😀", "é", ""]):
        out += [f"{a}{b}", f"{b}{a}", f"x{a}{b}{a}"]
    for _ in range(30):
        out.append("".join(rng.choice(WHITESPACE[:12] + ["w", "7", "!"]) for _ in range(rng.randint(2, 12))))
    out += ["trailing   ", "   leading", "a  b   c    d", "line1\nline2\r\nline3\rline4", "tab\tsep\tvalues\t",
            " " * 50, "\n" * 20, "\t \t \t", "x" + " " * 17 + "y"]
    return out


def _random_mixtures(rng: random.Random, count: int) -> list[str]:
    pools = [WORDS, PUNCT, WHITESPACE, EMOJI, CONTRACTIONS, list(SCRIPTS.values()), CODE, ACCENTED]
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 8)):
            item = rng.choice(rng.choice(pools))
            if len(item) > 30:
                start = rng.randrange(len(item) - 10)
                item = item[start : start + rng.randint(3, 30)]
            parts.append(item)
        out.append(("" if rng.random() < 0.5 else " ").join(parts))
    return out


def _special_texts() -> list[str]:
    out = SPECIAL_TEXTS + [f"x{s}y" for s in SPECIAL_TEXTS] + [f" {s} " for s in SPECIAL_TEXTS[:12]]
    out += ["<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>",
            "<|eot_id|><|eot_id|>", "<|EOT_ID|>", "<|eot_id", "eot_id|>", "< |eot_id| >", "<||>", "<|>"]
    return out


def groups() -> dict[str, list[str]]:
    """The corpus by case group, about 1,600 strings, always the same ones; a string is in one group only
    (the first that has it)."""
    rng = random.Random(20240418)
    scripts: list[str] = []
    for text in SCRIPTS.values():
        scripts += [text, text.upper(), text.lower(), text.replace(" ", "  "), text.replace(" ", "\n")]
        scripts += text.split()
    for word in ACCENTED:
        scripts += [unicodedata.normalize("NFC", word), unicodedata.normalize("NFD", word),
                    " " + unicodedata.normalize("NFD", word)]
    out = {
        "facts": list(PUBLISHED),
        "scripts": scripts,
        "code": CODE + [c.replace("\n", "\r\n") for c in CODE],
        "emoji": EMOJI + [v for e in EMOJI for v in (f" {e}", f"ok{e}", f"{e}\n")],
        "numbers": _numbers(rng),
        "contractions": _contractions(),
        "punctuation": PUNCT + [p * 3 for p in PUNCT] + [f" {p}\n\n" for p in PUNCT],
        "whitespace": _whitespace(rng),
        "mixed": _random_mixtures(rng, 700),
        "special-text": _special_texts(),
        # Control characters every byte-level vocabulary we test has (SmolLM2 lacks some, tested apart).
        "control": ["\x00", "a\x01b", "\x07", "\x1b[31mred\x1b[0m", "\x7f", "", "a", " "],
    }
    seen: set[str] = set()
    for name, texts in out.items():
        out[name] = [t for t in dict.fromkeys(texts) if not (t in seen or seen.add(t))]
    return out


def corpus() -> list[str]:
    """Every string of every group, in group order."""
    return [text for texts in groups().values() for text in texts]
