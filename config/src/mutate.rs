//! Hostile edits of a valid input file, for the property tests of every loader (issue 13): the
//! kinds of damage a user, a crash or an attacker produces. A test draws `(kind, at, pick)` from
//! its strategy and applies [`mutate`] to a known-good file; the loader must then return a value
//! or an error, never panic, and never hand back non-finite numbers.

/// Values that break naive range checks: non-finite, huge, tiny, negative, zero, non-numbers.
pub const NASTY: [&str; 18] = [
    "inf",
    "-inf",
    "nan",
    "1e308",
    "-1e308",
    "1e200",
    "1e-320",
    "0",
    "-0",
    "-1",
    "1e12",
    "4294967296",
    "18446744073709551616",
    "0.0",
    "\"x\"",
    "[]",
    "{}",
    "true",
];

/// Applies mutation `kind` (taken modulo the kinds) to `base`, at a position chosen by `at` and a
/// value chosen by `pick`:
/// 0. replace the `at`-th number with a [`NASTY`] value;
/// 1. truncate the text at a byte position;
/// 2. delete one line;
/// 3. duplicate one line;
/// 4. replace the `at`-th number with a large or small multiple of itself;
/// 5. insert a random printable byte.
pub fn mutate(base: &str, kind: u8, at: usize, pick: usize) -> String {
    let numbers = number_spans(base);
    let lines: Vec<&str> = base.lines().collect();
    let kind = kind % 6;
    match kind {
        0 | 4 if !numbers.is_empty() => {
            let (s, e) = numbers[at % numbers.len()];
            let new = if kind == 0 {
                NASTY[pick % NASTY.len()].to_string()
            } else {
                let scale = [1e-30, 1e-6, 0.5, 2.0, 1e6, 1e30, -1.0][pick % 7];
                let x: f64 = base[s..e].parse().unwrap_or(1.0);
                format!("{:e}", x * scale)
            };
            format!("{}{}{}", &base[..s], new, &base[e..])
        }
        1 => {
            let mut cut = at % (base.len() + 1);
            while !base.is_char_boundary(cut) {
                cut -= 1;
            }
            base[..cut].to_string()
        }
        2 | 3 if !lines.is_empty() => {
            let i = at % lines.len();
            let mut out: Vec<&str> = lines.clone();
            if kind == 2 {
                out.remove(i);
            } else {
                out.insert(i, lines[i]);
            }
            out.join("\n")
        }
        _ => {
            let mut cut = at % (base.len() + 1);
            while !base.is_char_boundary(cut) {
                cut -= 1;
            }
            let c = (b' ' + (pick % 95) as u8) as char;
            format!("{}{}{}", &base[..cut], c, &base[cut..])
        }
    }
}

/// Byte spans of the numeric literals in `text` (digits with an optional sign, point and
/// exponent), outside of nothing in particular: good enough to hit every value of a preset.
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let starts = b[i].is_ascii_digit() && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'));
        if !starts {
            i += 1;
            continue;
        }
        let s = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
        let mut e = i;
        while e < b.len() && (b[e].is_ascii_digit() || b[e] == b'.' || b[e] == b'e' || b[e] == b'E' || b[e] == b'_') {
            e += 1;
            if e < b.len() && (b[e - 1] == b'e' || b[e - 1] == b'E') && (b[e] == b'-' || b[e] == b'+') {
                e += 1;
            }
        }
        out.push((s, e));
        i = e;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_hit_numbers_lines_and_bytes() {
        let base = "a = 1.5\nb = [2, -3e4]\nname = 'x1'";
        assert_eq!(number_spans(base).len(), 3);
        assert_eq!(mutate(base, 0, 1, 0), "a = 1.5\nb = [inf, -3e4]\nname = 'x1'");
        assert_eq!(mutate(base, 1, 3, 0), "a =");
        assert_eq!(mutate(base, 2, 0, 0), "b = [2, -3e4]\nname = 'x1'");
        assert!(mutate(base, 4, 2, 4).contains("-3e10"));
        assert_eq!(mutate(base, 5, 0, 1).len(), base.len() + 1);
    }
}
