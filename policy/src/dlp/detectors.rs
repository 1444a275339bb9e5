//! The built-in detectors: their patterns and the validators that weed out
//! look-alikes the patterns alone cannot (Luhn, mod-97, SSN ranges...).
//!
//! Patterns use ASCII classes and `(?-u:\b)` only, so the whole set runs in
//! the lazy DFA whatever the body holds.

use super::DetectorSet;

/// Checks a candidate at `view[start..end]`; returns the end of the accepted
/// match (a validator may shorten it), or `None` to reject it.
pub(crate) type Validator = fn(view: &[u8], start: usize, end: usize) -> Option<usize>;

pub(crate) struct Builtin {
    pub(crate) name: &'static str,
    pub(crate) set: DetectorSet,
    pub(crate) regex: &'static str,
    pub(crate) validate: Option<Validator>,
    pub(crate) search: Search,
}

/// How candidates are looked for. A combined set of patterns without a
/// literal prefix runs at lazy-DFA speed (~500 MB/s); these keep every body
/// on a literal or byte-scan fast path instead.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Search {
    /// In the combined set: every pattern there starts with a literal, so
    /// the set skips ahead with a prefilter.
    Set,
    /// On its own: the pattern has a required inner literal (`@`).
    Direct,
    /// Anchored at the word-boundary starts of runs of digits (single spaces
    /// or dashes between them) holding at least `min_digits` digits; the
    /// pattern is `regex` without its leading `\b`, anchored.
    DigitRun {
        min_digits: usize,
        anchored: &'static str,
    },
    /// Anchored where two capitals and two digits start at a word boundary.
    Iban { anchored: &'static str },
}

/// The longest match of an anchored pattern, plus one byte for its trailing
/// word boundary: anchored searches only look this far.
pub(crate) const ANCHORED_SPAN: usize = 48;

pub(crate) const PRIVATE_KEY: &str = "private_key";
pub(crate) const SECRET_FILE: &str = "secret_file";

pub(crate) const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "aws_access_key_id",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)(?:AKIA|ASIA)[A-Z0-9]{16}(?-u:\b)",
        validate: None,
        search: Search::Set,
    },
    Builtin {
        name: "github_token",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82})(?-u:\b)",
        validate: None,
        search: Search::Set,
    },
    Builtin {
        name: "anthropic_api_key",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)sk-ant-[A-Za-z0-9_-]{20,}",
        validate: Some(anthropic_key),
        search: Search::Set,
    },
    Builtin {
        name: "openai_api_key",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
        validate: Some(openai_key),
        search: Search::Set,
    },
    Builtin {
        name: "slack_token",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)(?:xox[abposr]|xapp)-[A-Za-z0-9-]{10,}",
        validate: Some(slack_token),
        search: Search::Set,
    },
    Builtin {
        name: "google_api_key",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)AIza[0-9A-Za-z_-]{35}",
        validate: Some(not_followed_by_token_char),
        search: Search::Set,
    },
    Builtin {
        name: "stripe_live_key",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)[sr]k_live_[A-Za-z0-9]{24,}(?-u:\b)",
        validate: None,
        search: Search::Set,
    },
    Builtin {
        name: PRIVATE_KEY,
        set: DetectorSet::Secrets,
        regex: r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----",
        validate: None,
        search: Search::Set,
    },
    Builtin {
        name: "jwt",
        set: DetectorSet::Secrets,
        regex: r"(?-u:\b)eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*",
        validate: Some(not_followed_by_token_char),
        search: Search::Set,
    },
    Builtin {
        name: "email",
        set: DetectorSet::Pii,
        regex: r"[A-Za-z0-9._%+-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.[A-Za-z]{2,24}(?-u:\b)",
        validate: Some(email),
        search: Search::Direct,
    },
    Builtin {
        name: "payment_card",
        set: DetectorSet::Pii,
        regex: r"(?-u:\b)[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)",
        validate: Some(payment_card),
        search: Search::DigitRun {
            min_digits: 13,
            anchored: r"^[0-9](?:[ -]?[0-9]){12,18}(?-u:\b)",
        },
    },
    Builtin {
        name: "us_ssn",
        set: DetectorSet::Pii,
        regex: r"(?-u:\b)[0-9]{3}(?:-[0-9]{2}-|[ ][0-9]{2}[ ])[0-9]{4}(?-u:\b)",
        validate: Some(us_ssn),
        search: Search::DigitRun {
            min_digits: 9,
            anchored: r"^[0-9]{3}(?:-[0-9]{2}-|[ ][0-9]{2}[ ])[0-9]{4}(?-u:\b)",
        },
    },
    Builtin {
        name: "iban",
        set: DetectorSet::Pii,
        regex: r"(?-u:\b)[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?(?-u:\b)",
        validate: Some(iban),
        search: Search::Iban {
            anchored: r"^[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]{4}){2,7}(?:[ ]?[A-Z0-9]{1,4})?(?-u:\b)",
        },
    },
];

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// `(?-u:\b)` before `v[p]`, for a `p` holding a word byte.
fn boundary_before(v: &[u8], p: usize) -> bool {
    p == 0 || !is_word(v[p - 1])
}

/// Where number-shaped candidates can start, at or after `from`, in order.
#[derive(Default)]
pub(crate) struct NumberStarts {
    /// A digit at a word boundary, and how many digits its run holds from
    /// there (a run: digits with single spaces or dashes between them).
    pub(crate) digit_runs: Vec<(usize, usize)>,
    /// Two capitals then two digits, at a word boundary.
    pub(crate) ibans: Vec<usize>,
}

/// One pass over the digits of `v[from..]`.
pub(crate) fn number_starts(v: &[u8], from: usize, min_digits: usize) -> NumberStarts {
    let mut out = NumberStarts::default();
    let mut groups: Vec<(usize, usize)> = Vec::new();
    let mut i = from;
    while let Some(start) = next_digit(v, i) {
        i = walk_run(v, start, from, min_digits, &mut out, &mut groups);
    }
    out
}

/// The first ASCII digit at or after `i`, eight bytes at a time: most of a body is
/// not digits, and a byte-by-byte search was the scanner's largest cost.
fn next_digit(v: &[u8], mut i: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    while let Some(chunk) = v.get(i..i + 8) {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        let w = u64::from_le_bytes(word);
        // Per byte b < 0x80: b + 0x50 has its high bit set iff b >= 0x30, b + 0x46
        // iff b >= 0x3a; bytes >= 0x80 are masked out first (no carries) and last.
        let low = w & !HIGH;
        let digits = low.wrapping_add(0x50 * ONES) & !low.wrapping_add(0x46 * ONES) & !w & HIGH;
        if digits != 0 {
            return Some(i + (digits.trailing_zeros() / 8) as usize);
        }
        i += 8;
    }
    v.get(i..)?
        .iter()
        .position(u8::is_ascii_digit)
        .map(|k| i + k)
}

/// Records what starts at the digit `start`; returns where its run ends.
fn walk_run(
    v: &[u8],
    start: usize,
    from: usize,
    min_digits: usize,
    out: &mut NumberStarts,
    groups: &mut Vec<(usize, usize)>,
) -> usize {
    if start >= 2
        && start - 2 >= from
        && v[start - 2].is_ascii_uppercase()
        && v[start - 1].is_ascii_uppercase()
        && v.get(start + 1).is_some_and(u8::is_ascii_digit)
        && boundary_before(v, start - 2)
    {
        out.ibans.push(start - 2);
    }
    // Most runs are a single group (a year): settle those without the
    // bookkeeping.
    let mut j = start;
    while j < v.len() && v[j].is_ascii_digit() {
        j += 1;
    }
    let continues = j + 1 < v.len() && matches!(v[j], b' ' | b'-') && v[j + 1].is_ascii_digit();
    if !continues {
        if j - start >= min_digits && boundary_before(v, start) {
            out.digit_runs.push((start, j - start));
        }
        return j;
    }
    groups.clear();
    let mut digits = 0;
    let mut j = start;
    loop {
        groups.push((j, digits));
        while j < v.len() && v[j].is_ascii_digit() {
            digits += 1;
            j += 1;
        }
        if j + 1 < v.len() && matches!(v[j], b' ' | b'-') && v[j + 1].is_ascii_digit() {
            j += 1;
        } else {
            break;
        }
    }
    if digits >= min_digits {
        for &(p, before) in groups.iter() {
            if digits - before >= min_digits && boundary_before(v, p) {
                out.digit_runs.push((p, digits - before));
            }
        }
    }
    j
}

fn is_token_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

fn not_followed_by_token_char(v: &[u8], _start: usize, end: usize) -> Option<usize> {
    match v.get(end) {
        Some(&b)
            if is_token_char(b)
                || b == b'.' && v.get(end + 1).is_some_and(|&c| is_token_char(c)) =>
        {
            None
        }
        _ => Some(end),
    }
}

/// Real keys are random base62: a tail without digits and both cases is a
/// word (`sk-learn-contrib-...`), not a key.
fn looks_random(tail: &[u8]) -> bool {
    tail.iter().any(u8::is_ascii_digit)
        && tail.iter().any(u8::is_ascii_uppercase)
        && tail.iter().any(u8::is_ascii_lowercase)
}

fn openai_key(v: &[u8], start: usize, end: usize) -> Option<usize> {
    let m = &v[start..end];
    // The pattern cannot exclude Anthropic's `sk-ant-` prefix itself.
    if m.starts_with(b"sk-ant-") {
        return None;
    }
    let tail = [&b"sk-proj-"[..], b"sk-svcacct-", b"sk-admin-", b"sk-"]
        .iter()
        .find(|p| m.starts_with(p))
        .map_or(m, |p| &m[p.len()..]);
    looks_random(tail).then_some(end)
}

fn anthropic_key(v: &[u8], start: usize, end: usize) -> Option<usize> {
    let tail = &v[start + b"sk-ant-".len()..end];
    (tail.iter().any(u8::is_ascii_digit) && tail.iter().any(u8::is_ascii_alphabetic)).then_some(end)
}

fn slack_token(v: &[u8], start: usize, end: usize) -> Option<usize> {
    v[start + 5..end]
        .iter()
        .any(u8::is_ascii_digit)
        .then_some(end)
}

/// Extensions that follow `@` in asset names (`icon@2x.png`), not mail domains.
const NOT_TLDS: &[&[u8]] = &[
    b"png", b"jpg", b"jpeg", b"gif", b"svg", b"webp", b"js", b"css", b"ts",
];

fn email(v: &[u8], start: usize, end: usize) -> Option<usize> {
    let m = &v[start..end];
    let at = m.iter().position(|&b| b == b'@')?;
    let local = &m[..at];
    if local.first() == Some(&b'.') || local.last() == Some(&b'.') {
        return None;
    }
    let tld = &m[m.iter().rposition(|&b| b == b'.')? + 1..];
    if NOT_TLDS.iter().any(|t| tld.eq_ignore_ascii_case(t)) {
        return None;
    }
    Some(end)
}

/// A separator (`-`/space) then a digit beyond either end: the candidate is a
/// slice of a longer number, not a number of its own. Decimal points and a
/// leading `+` (phone numbers) count too; commas do not, so CSV lists of
/// numbers are still read one by one.
fn part_of_longer_number(v: &[u8], start: usize, end: usize) -> bool {
    let digit_at = |i: usize| v.get(i).is_some_and(u8::is_ascii_digit);
    let before = start
        .checked_sub(1)
        .and_then(|i| v.get(i).map(|&b| (i, b)))
        .is_some_and(|(i, b)| {
            b == b'+' || matches!(b, b'-' | b' ' | b'.') && i.checked_sub(1).is_some_and(digit_at)
        });
    let after = matches!(v.get(end), Some(b'-' | b' ' | b'.')) && digit_at(end + 1);
    before || after
}

fn payment_card(v: &[u8], start: usize, end: usize) -> Option<usize> {
    if part_of_longer_number(v, start, end) {
        return None;
    }
    let digits: Vec<u8> = v[start..end]
        .iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect();
    let n = digits.len();
    // Issuer prefixes and lengths keep timestamps (leading 1) and other
    // Luhn-valid accidents out.
    let plausible = match digits[0] {
        2 => n == 16,
        3 => (14..=16).contains(&n),
        4 => matches!(n, 13 | 16 | 19),
        5 => n == 16,
        6 => (16..=19).contains(&n),
        _ => false,
    };
    (plausible && luhn(&digits)).then_some(end)
}

pub(crate) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10)
}

fn us_ssn(v: &[u8], start: usize, end: usize) -> Option<usize> {
    if part_of_longer_number(v, start, end) {
        return None;
    }
    let m = &v[start..end];
    let num = |s: &[u8]| s.iter().fold(0u32, |a, b| a * 10 + u32::from(b - b'0'));
    let (area, group, serial) = (num(&m[0..3]), num(&m[4..6]), num(&m[7..11]));
    let ok = area != 0 && area != 666 && area < 900 && group != 0 && serial != 0;
    ok.then_some(end)
}

/// IBAN lengths by country (ISO 13616 registry); other prefixes are rejected.
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NL", 18),
    (b"NO", 15),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"SA", 24),
    (b"SC", 31),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
];

fn iban(v: &[u8], start: usize, end: usize) -> Option<usize> {
    let want = IBAN_LENGTHS
        .iter()
        .find(|(cc, _)| v[start..start + 2] == cc[..])?
        .1;
    // The pattern may have run on into following capitalised words
    // ("DE89 3704 ... 00 IS"): drop trailing groups until the length fits.
    let mut e = end;
    loop {
        let compact: Vec<u8> = v[start..e].iter().copied().filter(|&b| b != b' ').collect();
        if compact.len() == want {
            return iban_mod97(&compact).then_some(e);
        }
        if compact.len() < want {
            return None;
        }
        e = start + v[start..e].iter().rposition(|&b| b == b' ')?;
    }
}

fn iban_mod97(compact: &[u8]) -> bool {
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut rem: u32 = 0;
    for &b in rearranged {
        let val = match b {
            b'0'..=b'9' => u32::from(b - b'0'),
            b'A'..=b'Z' => u32::from(b - b'A') + 10,
            _ => return false,
        };
        rem = if val >= 10 {
            (rem * 100 + val) % 97
        } else {
            (rem * 10 + val) % 97
        };
    }
    rem == 1
}

/// Where a PEM private-key block that starts at `from` (just after its
/// header) ends.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BlockEnd {
    /// The block ends here (after its END line, or before the first byte
    /// that cannot be part of it).
    Closed(usize),
    /// The bytes ran out first; resume looking from this offset (an END
    /// line may have started there).
    Open(usize),
}

/// Bytes a PEM body can hold, raw or escaped inside JSON (`\n`, `\u002d`) or
/// a form (`%0A`, `+`), including legacy `Proc-Type:`/`DEK-Info:` headers.
fn in_pem_body(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'+' | b'/'
                | b'='
                | b' '
                | b'\t'
                | b'\r'
                | b'\n'
                | b'-'
                | b':'
                | b','
                | b'.'
                | b'\\'
                | b'%'
        )
}

/// Worked on raw bytes so the same function serves whole bodies and streams:
/// every escape form of the body is made of [`in_pem_body`] bytes.
pub(crate) fn pem_block_end(raw: &[u8], from: usize, eof: bool) -> BlockEnd {
    const END: &[u8] = b"-----END";
    let mut i = from;
    while i < raw.len() {
        let b = raw[i];
        if b == b'-' {
            let rest = &raw[i..];
            if rest.len() < END.len() {
                if END.starts_with(rest) && !eof {
                    return BlockEnd::Open(i);
                }
            } else if rest.starts_with(END) {
                // `-----END` + label (spaces possibly `+` or `%20`) + `-----`.
                let mut j = i + END.len();
                while j < raw.len()
                    && j - i < 96
                    && (raw[j].is_ascii_alphanumeric() || matches!(raw[j], b' ' | b'+' | b'%'))
                {
                    j += 1;
                }
                let tail = &raw[j..];
                if tail.len() >= 5 && tail.starts_with(b"-----") {
                    return BlockEnd::Closed(j + 5);
                }
                if tail.len() < 5 && b"-----".starts_with(tail) && !eof {
                    return BlockEnd::Open(i);
                }
            }
        } else if !in_pem_body(b) {
            return BlockEnd::Closed(i);
        }
        i += 1;
    }
    if eof {
        BlockEnd::Closed(raw.len())
    } else {
        BlockEnd::Open(raw.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_known_values() {
        let d = |s: &str| s.bytes().map(|b| b - b'0').collect::<Vec<_>>();
        assert!(luhn(&d("4111111111111111")));
        assert!(luhn(&d("79927398713")));
        assert!(!luhn(&d("4111111111111112")));
    }

    #[test]
    fn iban_checks() {
        assert_eq!(iban(b"GB82WEST12345698765432", 0, 22), Some(22));
        assert_eq!(iban(b"GB82WEST12345698765433", 0, 22), None);
        let spaced = b"DE89 3704 0044 0532 0130 00 ABCD";
        assert_eq!(iban(spaced, 0, spaced.len()), Some(27));
        assert_eq!(iban(b"ZZ82WEST12345698765432", 0, 22), None);
    }

    #[test]
    fn pem_block_extent() {
        let b = b"MIIE\\nabc\\n-----END RSA PRIVATE KEY-----\\n\"}";
        assert_eq!(pem_block_end(b, 0, false), BlockEnd::Closed(40));
        assert_eq!(
            pem_block_end(b"MIIE\nabc\n-----EN", 0, false),
            BlockEnd::Open(9)
        );
        assert_eq!(
            pem_block_end(b"MIIE\nabc\n-----EN", 0, true),
            BlockEnd::Closed(16)
        );
        assert_eq!(
            pem_block_end(b"MIIE\nabc\"rest", 0, true),
            BlockEnd::Closed(8)
        );
        assert_eq!(
            pem_block_end(b"x-----END+RSA+PRIVATE+KEY-----&a=1", 0, true),
            BlockEnd::Closed(30)
        );
    }
}

#[cfg(test)]
mod search_tests {
    use super::*;
    use proptest::prelude::*;
    use regex::bytes::Regex;

    /// Matches of one detector through [`number_starts`] and its anchored
    /// pattern, the way the engine runs them.
    fn anchored_matches(v: &[u8], b: &Builtin) -> Vec<(usize, usize)> {
        let starts = number_starts(v, 0, 9);
        let (positions, anchored): (Vec<usize>, &str) = match b.search {
            Search::DigitRun {
                min_digits,
                anchored,
            } => (
                starts
                    .digit_runs
                    .iter()
                    .filter(|(_, n)| *n >= min_digits)
                    .map(|(p, _)| *p)
                    .collect(),
                anchored,
            ),
            Search::Iban { anchored } => (starts.ibans, anchored),
            _ => unreachable!(),
        };
        let re = Regex::new(anchored).unwrap();
        let mut out = Vec::new();
        let mut next = 0;
        for p in positions {
            if p < next {
                continue;
            }
            if let Some(m) = re.find(&v[p..v.len().min(p + ANCHORED_SPAN)]) {
                next = p + m.end();
                out.push((p, next));
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// The anchored search finds exactly what the plain pattern finds.
        #[test]
        fn anchored_search_equals_find_iter(s in "[0-9 \\-A-Fa-f+/.]{0,300}", pad in 0usize..70) {
            let mut v = b"x".repeat(pad);
            v.extend_from_slice(s.as_bytes());
            for b in BUILTINS.iter().filter(|b| matches!(b.search, Search::DigitRun { .. } | Search::Iban { .. })) {
                let plain: Vec<(usize, usize)> = Regex::new(b.regex).unwrap().find_iter(&v).map(|m| (m.start(), m.end())).collect();
                prop_assert_eq!(anchored_matches(&v, b), plain, "{}", b.name);
            }
        }
    }

    #[test]
    fn anchored_search_on_samples() {
        let v = b"DE89370400440532013000 x GB82 WEST 1234 5698 7654 32 4111 1111 1111 1111 123-45-6789 ab12 3456 7890 1234 5678";
        for b in BUILTINS
            .iter()
            .filter(|b| matches!(b.search, Search::DigitRun { .. } | Search::Iban { .. }))
        {
            let plain: Vec<(usize, usize)> = Regex::new(b.regex)
                .unwrap()
                .find_iter(v)
                .map(|m| (m.start(), m.end()))
                .collect();
            assert!(!plain.is_empty(), "{}", b.name);
            assert_eq!(anchored_matches(v, b), plain, "{}", b.name);
        }
    }
}

#[cfg(test)]
mod next_digit_tests {
    use super::next_digit;

    #[test]
    fn finds_the_first_digit_like_a_byte_search() {
        let mut bytes: Vec<u8> = (0u8..=255).collect();
        bytes.extend_from_slice(b"no digits here at all, none./:@`");
        for start in 0..bytes.len() {
            for end in start..bytes.len().min(start + 40) {
                let v = &bytes[start..end];
                for i in 0..=v.len() {
                    let expect = v[i..].iter().position(u8::is_ascii_digit).map(|k| i + k);
                    assert_eq!(next_digit(v, i), expect, "{v:?} from {i}");
                }
            }
        }
    }
}
