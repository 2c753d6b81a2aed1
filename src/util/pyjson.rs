//! JSON text exactly as Python's `json.dumps(value, ensure_ascii=False)` writes it: `", "`
//! and `": "` separators, keys in the order given, non-ASCII kept, control characters as
//! `\uXXXX` (except `\n`, `\r`, `\t`, `\b`, `\f`), and reals as Python's `repr` (`1e-05`,
//! `0.0`). The paper's scripts write their training examples this way, and a model
//! fine-tuned on them learns that exact text.

/// A JSON string literal.
pub fn string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A real as Python's `repr(float)`: the shortest digits that read back to `x`,
/// positional for exponents -4..16, else `d.ddde±XX`.
pub fn float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // `{:e}` gives the shortest round-trip digits: "1.2345e-5", "3e0"
    let e = format!("{x:e}");
    let (mantissa, exp) = e.split_once('e').expect("{:e} has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = mantissa.strip_prefix('-').map(|m| ("-", m)).unwrap_or(("", mantissa));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        format!("{sign}{m}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs())
    }
}

/// An object from `(key, already-encoded value)` pairs, in that order.
pub fn object(fields: &[(&str, String)]) -> String {
    let inner: Vec<String> = fields.iter().map(|(k, v)| format!("{}: {v}", string(k))).collect();
    format!("{{{}}}", inner.join(", "))
}

/// A list of strings.
pub fn string_list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| string(s)).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected strings printed by CPython 3.11's json.dumps(..., ensure_ascii=False) and repr.
    #[test]
    fn matches_pythons_json_dumps() {
        let hp = object(&[
            ("lora_rank", "32".into()),
            ("lora_alpha", "64".into()),
            ("lora_dropout", float(0.0)),
            ("learning_rate", float(1e-5)),
            ("num_epochs", "3".into()),
            ("gradient_accumulation_steps", "1".into()),
        ]);
        let t = object(&[("data_creation_instruction", string("Say \"hi\"\n\tcafé \u{1} \\ /")), ("hyperparameters", hp)]);
        assert_eq!(
            t,
            r#"{"data_creation_instruction": "Say \"hi\"\n\tcafé \u0001 \\ /", "hyperparameters": {"lora_rank": 32, "lora_alpha": 64, "lora_dropout": 0.0, "learning_rate": 1e-05, "num_epochs": 3, "gradient_accumulation_steps": 1}}"#
        );
        let seqs = object(&[("training_sequences", string_list(&["a".into(), "b\u{2028}c".into(), "".into()]))]);
        assert_eq!(seqs, "{\"training_sequences\": [\"a\", \"b\u{2028}c\", \"\"]}");
        let reprs = [
            (0.001, "0.001"),
            (1e-05, "1e-05"),
            (0.0001, "0.0001"),
            (5e-3, "0.005"),
            (2.5e-4, "0.00025"),
            (1e16, "1e+16"),
            (123456789012345678.0, "1.2345678901234568e+17"),
            (0.1 + 0.2, "0.30000000000000004"),
            (3.0, "3.0"),
            (100.0, "100.0"),
            (1e-7, "1e-07"),
            (12345.678, "12345.678"),
            (-0.5, "-0.5"),
        ];
        for (x, want) in reprs {
            assert_eq!(float(x), want, "{x}");
        }
    }
}
