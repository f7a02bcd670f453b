//! The simulator's tokenizer: text to token ids by a fixed rule of its own, close enough to a
//! BPE tokenizer's counts that prompt lengths, prefill times and prefix-cache blocks behave like
//! a real engine's, without shipping a vocabulary.
//!
//! # The rule
//! Text is first cut into pieces, in the manner of GPT-style pre-tokenization:
//! - a run of letters (Unicode alphabetic characters), with the one space (U+0020) before it if
//!   there is one, is one piece (`" hello"`);
//! - a run of digits (Unicode numeric characters) is cut into groups of at most 3 (`"12345"` is
//!   `"123"`, `"45"`); digits take no leading space;
//! - a run of other visible characters (punctuation, symbols), with the one space before it if
//!   there is one, is one piece (`" ..."`);
//! - a run of whitespace holding line breaks is one piece up to and including its last line
//!   break (`"  \n\n"`); the rest of the run is read as below;
//! - any other run of whitespace is one piece, except that when a letter or symbol follows, its
//!   last space goes with that piece instead (`"   x"` is `"  "`, `" x"`).
//!
//! A piece of at most [`MAX_TOKEN_BYTES`] bytes is one token; a longer piece is cut, at character
//! boundaries, into tokens of at most that many bytes (`" assistant"` is `" assis"`, `"tant"`), as a
//! BPE vocabulary holds short words whole and splits long or rare ones. A token's id is a stable
//! hash of its bytes, below [`TEXT_VOCAB`] (ids from there up are the chat template's special
//! tokens, which never come out of text).
//!
//! English prose comes to about 4 bytes a token (4.1 on this module's test paragraph; markdown
//! with code, like the README, to about 3.3), and the load generator's filler text (random
//! lowercase words of 2 to 8 letters) to 4.2: near the 4 bytes a token usually quoted for BPE
//! tokenizers on English. It reads any `&str`, allocates nothing but the ids it returns, and
//! cannot panic.

use xxhash_rust::xxh3::xxh3_64;

/// Token ids of text are below this; the chat template's special tokens start here.
pub const TEXT_VOCAB: u32 = 128_000;

/// The longest piece that is one token.
pub const MAX_TOKEN_BYTES: usize = 6;

/// Appends the token ids of `text` to `out`.
pub fn tokenize_into(text: &str, out: &mut Vec<u32>) {
    out.extend(tokens(text).map(token_id));
}

/// The token ids of `text`.
pub fn tokenize(text: &str) -> Vec<u32> {
    let mut out = Vec::with_capacity(text.len() / 4 + 1);
    tokenize_into(text, &mut out);
    out
}

/// How many tokens `text` is, without building them.
pub fn count(text: &str) -> usize {
    tokens(text).count()
}

/// The id of one token's text.
pub fn token_id(token: &str) -> u32 {
    (xxh3_64(token.as_bytes()) % u64::from(TEXT_VOCAB)) as u32
}

/// The text of each token of `text`, in order.
pub fn tokens(text: &str) -> impl Iterator<Item = &str> {
    Pieces { rest: text }.flat_map(|piece| Chunks { rest: piece })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Newline,
    Space,
    Symbol,
}

fn class(c: char) -> Class {
    if c.is_alphabetic() {
        Class::Letter
    } else if c.is_numeric() {
        Class::Digit
    } else if c == '\n' || c == '\r' {
        Class::Newline
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Symbol
    }
}

/// The byte length of the leading run of `s` whose characters are of a class `of` accepts, at
/// most `max` characters.
fn run_len(s: &str, of: impl Fn(Class) -> bool, max: usize) -> usize {
    let mut end = 0;
    for (n, (i, c)) in s.char_indices().enumerate() {
        if n == max || !of(class(c)) {
            return i;
        }
        end = i + c.len_utf8();
    }
    end
}

/// Pre-tokenization: the pieces of the module's rule.
struct Pieces<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest;
        let first = s.chars().next()?;
        let len = piece_len(s, first);
        // A piece is never empty (the first character always belongs to it), so this ends.
        let (piece, rest) = s.split_at(len.max(first.len_utf8()));
        self.rest = rest;
        Some(piece)
    }
}

/// The byte length of the piece `s` starts with; `first` is its first character.
fn piece_len(s: &str, first: char) -> usize {
    let words = |c: Class| c == Class::Letter || c == Class::Symbol;
    match class(first) {
        Class::Space if first == ' ' => match s[1..].chars().next().map(class) {
            // The space leads the word or symbol run after it.
            Some(next) if words(next) => 1 + run_len(&s[1..], |c| c == next, usize::MAX),
            _ => whitespace_len(s),
        },
        Class::Space | Class::Newline => whitespace_len(s),
        Class::Digit => run_len(s, |c| c == Class::Digit, 3),
        other => run_len(s, |c| c == other, usize::MAX),
    }
}

/// The byte length of the whitespace piece `s` starts with.
fn whitespace_len(s: &str) -> usize {
    let run = run_len(s, |c| c == Class::Space || c == Class::Newline, usize::MAX);
    let ws = &s[..run];
    if let Some(last_break) = ws.rfind(['\n', '\r']) {
        return last_break + 1;
    }
    // A space ending the run goes with the word or symbol after it.
    let next_is_word = s[run..]
        .chars()
        .next()
        .is_some_and(|c| matches!(class(c), Class::Letter | Class::Symbol));
    if next_is_word && ws.len() > 1 && ws.ends_with(' ') {
        run - 1
    } else {
        run
    }
}

/// A piece cut into tokens of at most [`MAX_TOKEN_BYTES`] bytes at character boundaries.
struct Chunks<'a> {
    rest: &'a str,
}

impl<'a> Iterator for Chunks<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let s = self.rest;
        let first = s.chars().next()?;
        // The largest character boundary within the limit; a character is at most 4 bytes, so
        // the first one always fits.
        let mut end = first.len_utf8();
        for (i, c) in s.char_indices().skip(1) {
            if i + c.len_utf8() > MAX_TOKEN_BYTES {
                break;
            }
            end = i + c.len_utf8();
        }
        let (token, rest) = s.split_at(end);
        self.rest = rest;
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &str) -> Vec<&str> {
        tokens(s).collect()
    }

    #[test]
    fn words_take_their_leading_space_and_long_ones_split() {
        assert_eq!(toks("hello there"), ["hello", " there"]);
        assert_eq!(
            toks("You are the assistant."),
            ["You", " are", " the", " assis", "tant", "."]
        );
        assert_eq!(count("hello there"), 2);
    }

    #[test]
    fn digits_group_by_three_and_symbols_run() {
        assert_eq!(toks("x=12345!"), ["x", "=", "123", "45", "!"]);
        assert_eq!(toks("a ... b"), ["a", " ...", " b"]);
        assert_eq!(toks("in 2024"), ["in", " ", "202", "4"]);
    }

    #[test]
    fn whitespace_runs_and_line_breaks() {
        assert_eq!(toks("a\n\nb"), ["a", "\n\n", "b"]);
        assert_eq!(toks("a   b"), ["a", "  ", " b"]);
        assert_eq!(toks("a \n  b"), ["a", " \n", " ", " b"]);
        assert_eq!(toks("\t\tx"), ["\t\t", "x"]);
        assert_eq!(toks("end  "), ["end", "  "]);
        assert_eq!(toks(" "), [" "]);
        assert_eq!(toks(""), Vec::<&str>::new());
    }

    #[test]
    fn unicode_is_cut_at_character_boundaries() {
        // Three 3-byte letters fit in no 6-byte token: two and one.
        assert_eq!(toks("日本語"), ["日本", "語"]);
        assert_eq!(toks(" café"), [" café"]);
        assert_eq!(toks("🙂🙂🙂"), ["🙂", "🙂", "🙂"]);
        assert_eq!(toks("naïve٣٤"), ["naïve", "٣٤"]);
    }

    #[test]
    fn ids_are_stable_text_ids() {
        let a = tokenize("the cat sat on the mat");
        assert_eq!(a.len(), 6);
        assert_eq!(a[0], token_id("the"));
        assert_eq!(a[1], token_id(" cat"));
        assert_eq!(a[4], token_id(" the"));
        assert_ne!(a[0], a[4], "a leading space makes another token");
        assert!(a.iter().all(|&id| id < TEXT_VOCAB));
        assert_eq!(a, tokenize("the cat sat on the mat"));
    }

    #[test]
    fn tokens_cover_the_text_exactly_on_any_input() {
        let mut rng = fastrand::Rng::with_seed(5);
        let alphabet: Vec<char> = " \n\r\t\u{a0}aZé日🙂7٣.,'\"-_()\u{300}\u{200b}\0"
            .chars()
            .collect();
        for _ in 0..2_000 {
            let len = rng.usize(0..40);
            let s: String = (0..len)
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            let t = toks(&s);
            assert_eq!(t.concat(), s, "{s:?}");
            assert!(
                t.iter()
                    .all(|x| !x.is_empty() && x.len() <= MAX_TOKEN_BYTES)
            );
            assert_eq!(count(&s), t.len());
        }
    }

    #[test]
    fn prose_and_filler_come_near_four_bytes_a_token() {
        let prose = "The quick brown fox jumps over the lazy dog. A model server keeps the \
                     key and value tensors of every token it has seen in its cache, so that a \
                     later request which begins with the same text can skip that work.\n\n\
                     Picking the server that already holds a prompt's beginning saves time.";
        let per_token = prose.len() as f64 / count(prose) as f64;
        assert!((3.8..4.4).contains(&per_token), "prose: {per_token}");
        let mut rng = fastrand::Rng::with_seed(1);
        let mut filler = String::new();
        while filler.len() < 20_000 {
            for _ in 0..rng.usize(2..9) {
                filler.push(rng.lowercase());
            }
            filler.push(' ');
        }
        let per_token = filler.len() as f64 / count(&filler) as f64;
        assert!((4.1..4.3).contains(&per_token), "filler: {per_token}");
    }
}
