"""Test text for the tokenizer, and the Unicode tables that tokenizer.c carries.

    python tests/tokcorpus.py corpus DIR   writes the corpus pieces to DIR (one file each)
    python tests/tokcorpus.py tables       prints the C tables pasted into tokenizer.c

The corpus is deterministic: fixed files that every Debian machine of this project has (licence
texts, libc and Python headers, the repo's own sources), and text generated from a seeded random
generator. build_corpus() returns [(name, bytes)]; most pieces are valid UTF-8, the ones whose
name starts with "invalid" are not, on purpose.
"""
import os
import random
import sys
import unicodedata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Unicode tables for tokenizer.c

def _ranges(pred):
    out, start = [], None
    for c in range(0x110000 + 1):
        ok = c < 0x110000 and pred(c)
        if ok and start is None:
            start = c
        elif not ok and start is not None:
            out.append((start, c - 1))
            start = None
    return out


def unicode_tables_c():
    """The C text between the BEGIN/END UNICODE TABLES markers of tokenizer.c.

    Letters are general categories L* (Lu Ll Lt Lm Lo), numbers N* (Nd Nl No): what the regex
    classes \\p{L} and \\p{N} mean to Oniguruma (used by Hugging Face tokenizers) and llama.cpp,
    and what Rust's char::is_numeric means to the Digits pre-tokenizer. White_Space is small and
    hard-coded in tokenizer.c (Python's str.isspace differs from it: it includes U+001C..U+001F).
    """
    def table(name, rs):
        lines = [f"static const uint32_t {name}[][2] = {{"]
        for i in range(0, len(rs), 4):
            lines.append("    " + " ".join(f"{{0x{a:x}, 0x{b:x}}}," for a, b in rs[i:i + 4]))
        lines.append("};")
        return lines

    cat = lambda c: unicodedata.category(chr(c))
    letters = _ranges(lambda c: cat(c)[0] == "L")
    numbers = _ranges(lambda c: cat(c)[0] == "N")
    out = [f"/* Unicode {unicodedata.unidata_version}; closed ranges [lo, hi], ascending */"]
    out += table("letter_ranges", letters) + table("number_ranges", numbers)
    return "\n".join(out) + "\n"

# ---------------------------------------------------------------------------------------------
# Corpus

LICENCE_DIR = "/usr/share/common-licenses"
SOURCE_FILES = [
    "/usr/include/stdio.h", "/usr/include/stdlib.h", "/usr/include/string.h",
    "/usr/include/math.h", "/usr/include/unistd.h", "/usr/include/elf.h",
    "/usr/lib/python3.11/textwrap.py", "/usr/lib/python3.11/json/decoder.py",
    "/usr/lib/python3.11/shlex.py", "/usr/lib/python3.11/this.py",
    os.path.join(REPO, "leankv.h"), os.path.join(REPO, "tokenizer.c"),
]
CHUNK = 6000   # long files are cut at line ends into pieces of about this many bytes

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>",
            "<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>",
            "<issue_closed>", "<jupyter_start>", "<jupyter_text>", "<jupyter_code>",
            "<jupyter_output>", "<jupyter_script>", "<empty_output>"]

# bytes that SmolLM2's vocabulary has no token for (and that valid UTF-8 text can contain)
MISSING_BYTES = "\x04\x06\x13\x14\x16\x1d"

HAND_WRITTEN = {
    "accents": "Café déjà vu, naïve façade; Ærøskøbing; Größe, Straße, Übermut. "
               "Łódź, Kraków, źdźbło; Tiếng Việt có dấu: người, được, những. "
               "Ελληνικά: καλημέρα κόσμε. Русский: съешь же ещё этих мягких булок. "
               "NFD: Cafe\u0301 de\u0301ja\u0300 vu, n\u0303 a\u0308\u0304 z\u0327\u0301. "
               "עברית: שלום עולם. العربية: مرحبا بالعالم ١٢٣. हिन्दी: नमस्ते दुनिया ४५६. "
               "ไทย: สวัสดีชาวโลก. Հայերեն, ქართული, አማርኛ.",
    "cjk": "中文：你好，世界！今天是2024年11月27日。日本語：こんにちは、世界。カタカナ、ひらがな。"
           "한국어: 안녕하세요 세계. 繁體字與简体字混合。全角ＡＢＣ１２３！？　「引用」『二重』【括弧】"
           "𠀀𠀁𪚥 (supplementary ideographs). 漢字かな交じり文で、句読点。",
    "emoji": "Emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵 ❤️ ☕ 🚀✨ 🤖 1️⃣ #️⃣ "
             "keycaps and ZWJ: 🧑‍💻 🐈‍⬛; text ☺ vs emoji ☺️; mahjong 🀄; cards 🂡.",
    "contractions": "I'm sure you're right, we've seen it; they'll say he'd go. Don't, can't, "
                    "won't. I'M LOUD, YOU'RE, WE'VE, THEY'LL, HE'D, IT'S, DON'T. 's 't 're "
                    "'ve 'm 'll 'd 'S 'T 'RE 'x '' ''s 'ſ 'ſt ʼs ’s ‘quoted’ \"double\" 'tis "
                    "rock'n'roll O'Neil's 90's '90s x'y 's's'",
    "numbers": "0 1 12 123 1234 12345 123456 3.14159 2.71828e-10 -42 +7 1,000,000 1_000_000 "
               "0x1F 0b1011 0o777 1e9 ½ ¼ ¾ ⅓ ² ³ ¹ ⁴ ₅ Ⅻ ⅻ ① ⑩ ⓵ ０１２ ١٢٣ ۴۵۶ ४५६ "
               "৭৮৯ ๑๒๓ 〇〡〢 𝟘𝟙𝟚 12ab34 a1b2c3 v2.0.1 3rd 21st 100% $5.99 €10 ¥1000 "
               " 1  22   333\t4444\n55555 ",
    "whitespace": "a b  c   d    e\tf\t\tg \t h\n\ni\r\nj\r\n\r\nk \n l\x0bm\x0cn\x85o\xa0p"
                  "\u1680q\u2000r\u2003s\u2009t\u200au\u2028v\u2029w\u202fx\u205fy\u3000z"
                  "\x1c1\x1d2\x1e3\x1f4 \u200b zero-width \ufeff BOM \u00ad shy "
                  "   \n\n\n   \t\t\t\n      end   ",
    "specials": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                "Hugging Face<|im_end|>\n<|im_start|>user\nHi there!<|im_end|>\n"
                "<|im_start|>assistant\n<|endoftext|><|endoftext|>x<|im_end|><|im_end|>"
                " <|im_start|> <|im_sta <|im_start <|im_start|<|im_start|>> <<|im_end|>>"
                "<|<|endoftext|>|> <file_sep><filename>a.c<gh_stars>10<empty_output>"
                "<jupyter_start><jupyter_text>md<jupyter_code>x=1<jupyter_output>1"
                "<jupyter_script><issue_start><issue_comment><issue_closed><repo_name><reponame>"
                "<|im_end|>",
    "missing_bytes": "ctl:\x04\x06x\x13\x14\x16y\x1dz \x04 \x06\x06\x06 a\x04b "
                     "<\x13> \x1d\x1d \x16\n\x14\t\x04\x06\x13\x14\x16\x1d.",
    "code_json": '{"key": [1, 2.5, -3e4, true, null], "nested": {"a\\n": "\\u00e9\\ud83d"}}\n'
                 "if (x != 0 && y <= 1) { z += a[i++] << 2; } // comment\n"
                 "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n"
                 "def f(x, *args, **kw):\n    return [y ** 2 for y in range(x) if y % 3 == 0]\n"
                 "SELECT * FROM t WHERE a >= 10 AND b LIKE '%x%';\n$ ls -la | grep -v '^d'\n"
                 "https://example.com/path?q=1&r=two#frag user@example.org ~/.config/x.y\n"
                 "====== ------ ****** ###### ...... ,,,,,, !!!??? <<<>>> ((()))\n",
    "dates": "2024-11-27T00:10:59Z 27/11/2024 11/27/24 Nov 27, 2024 at 12:05:07.123 "
             "+05:30 1999-12-31 23:59:59 UTC; Q3 FY2025; 24h 7d 52w; 10:30am-11:45pm.",
}


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _chunks(name, data):
    """cuts data at line ends into pieces of about CHUNK bytes"""
    out, start = [], 0
    while start < len(data):
        end = data.find(b"\n", start + CHUNK)
        end = len(data) if end < 0 else end + 1
        out.append((f"{name}#{len(out)}", data[start:end]))
        start = end
    return out


def _generated(rng):
    """text from a seeded generator: dates, digit runs, whitespace runs, character soup"""
    out = []
    lines = []
    for _ in range(300):
        y, mo, d = rng.randint(1900, 2099), rng.randint(1, 12), rng.randint(1, 28)
        h, mi, s = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        fmt = rng.choice(["{y}-{mo:02d}-{d:02d}", "{d}/{mo}/{y}",
                          "{y}{mo:02d}{d:02d}T{h:02d}{mi:02d}",
                          "{h}:{mi:02d}:{s:02d}", "{d}.{mo}.{y} {h}h{mi}", "v{y}.{mo}.{d}",
                          "{y}年{mo}月{d}日", "${h}.{mi:02d}", "{y}/{mo}/{d} {h}:{mi}"])
        lines.append(fmt.format(y=y, mo=mo, d=d, h=h, mi=mi, s=s))
    out.append(("dates_generated", " ".join(lines).encode()))
    digits = []
    for _ in range(200):
        n = rng.randint(1, 40)
        digits.append("".join(rng.choice("0123456789") for _ in range(n)))
    out.append(("digit_runs", (" ".join(digits) + "\n" + ",".join(digits)).encode()))
    ws = []
    for _ in range(400):
        ws.append(rng.choice(["a", "b", "word", "x1", ".", "(", "é", "中"]))
        ws.append("".join(rng.choice([" ", " ", " ", "\t", "\n", "\r\n", "\u3000", "\xa0"])
                          for _ in range(rng.randint(1, 6))))
    out.append(("whitespace_runs", "".join(ws).encode()))
    # character soup from a pool of classes the pre-tokenizers treat differently
    pool = (list("abcXYZ'sStTmMdDrRvVeElL0123456789 \t\n\r.,;:!?'\"()[]{}<>-_+=*/\\|@#$%^&~`")
            + list("éÆßĳſǅʰσДאب中あア한") + list("١٢٣४५६½²Ⅻ①")
            + list("\xa0\u2003\u3000\u2028\x85\x0b\x1c") + ["😀", "👍🏽", "🇫🇷", "\u0301", "\u200d",
                                                          "\ufffd", "€", "™", "…", "—", "«", "»"])
    for k in range(12):
        n = rng.randint(500, 3000)
        out.append((f"soup{k}", "".join(rng.choice(pool) for _ in range(n)).encode()))
    # runs of one character: many equal-rank merges, where leftmost-first matters
    runs = []
    for ch in [" ", "=", "-", "a", "e", "0", "\n", "\t", ".", "中", "😀", "\u3000", "'", "ab"]:
        for n in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 64, 100):
            runs.append(ch * n)
    out.append(("char_runs", "|".join(runs).encode()))
    out.append(("long_space_run", (" " * 3001 + "x" + "=" * 2999 + "\n" * 1000).encode()))
    # special tokens dropped into random text
    words = "the quick brown fox jumps over lazy dog 42 3.5 don't \n  \t".split(" ")
    parts = []
    for _ in range(300):
        r = rng.random()
        parts.append(rng.choice(SPECIALS) if r < 0.2 else
                     rng.choice(SPECIALS)[:rng.randint(1, 8)] if r < 0.3 else
                     rng.choice(words) + rng.choice(["", " ", "  ", "\n"]))
    out.append(("specials_mixed", "".join(parts).encode()))
    return out


INVALID = {
    "invalid_lone": b"abc\x80def\xbf\xc0\xc1 \xf5\xf6\xf7\xf8\xf9\xfa\xfb\xfc\xfd\xfe\xff end",
    "invalid_truncated": b"trunc2 \xc3 trunc3 \xe4\xb8 trunc4 \xf0\x9f\x98 x \xe2\x82",
    "invalid_overlong": b"overlong \xc0\xaf \xe0\x80\xaf \xf0\x80\x80\xaf \xc1\xbf ok",
    "invalid_surrogate": b"surrogates \xed\xa0\x80 \xed\xbf\xbf \xed\x9f\xbf(valid) after",
    "invalid_too_big": b"big \xf4\x90\x80\x80 \xf4\x8f\xbf\xbf(valid) \xf7\xbf\xbf\xbf end",
    "invalid_mixed": "héllo wörld ".encode() + b"\xe9\xe8 caf\xe9 " + "中文".encode()[:4]
                     + b"\x80\x80 <|im_end|>\xff<|im_start|>" + "😀".encode()[1:] + b"\n",
    "invalid_at_end": b"ends inside a character \xf0\x9f",
}


def build_corpus():
    pieces = []
    for name in sorted(os.listdir(LICENCE_DIR)):
        path = os.path.join(LICENCE_DIR, name)
        if os.path.isfile(path):
            pieces += _chunks("licence/" + name, _read(path))
    for path in SOURCE_FILES:
        if os.path.isfile(path):
            pieces += _chunks("source/" + os.path.basename(path), _read(path))
    for name, text in HAND_WRITTEN.items():
        pieces.append((name, text.encode()))
    pieces += _generated(random.Random(20241127))
    for name, data in INVALID.items():
        pieces.append((name, data))
    # tiny pieces: edge cases of the splitting rules at the very start and end of the text
    tiny = ["", " ", "  ", "\n", " \n", "a", " a", "a ", "1", " 1", "  1", "12", "'", "'s",
            "<|im_end|>", "<|im_end|> ", " <|im_end|>", "\x04", "\U0010FFFD", "\ufffd"]
    for k, s in enumerate(tiny):
        pieces.append((f"tiny{k}", s.encode()))
    return pieces


def write_corpus(directory):
    """writes each piece to DIR/NNNN.txt; returns [(name, path, bytes)]"""
    os.makedirs(directory, exist_ok=True)
    out = []
    for k, (name, data) in enumerate(build_corpus()):
        path = os.path.join(directory, f"{k:04d}.txt")
        with open(path, "wb") as f:
            f.write(data)
        out.append((name, path, data))
    return out


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1] == "tables":
        sys.stdout.write(unicode_tables_c())
    elif len(sys.argv) == 3 and sys.argv[1] == "corpus":
        pieces = write_corpus(sys.argv[2])
        print(f"{len(pieces)} pieces, {sum(len(p[2]) for p in pieces)} bytes")
    else:
        sys.exit(__doc__)
