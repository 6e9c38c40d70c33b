//! Secret masking for runner output and results.
//!
//! Every occurrence of a secret value, however short, is replaced by
//! [`aviary_core::model::MASK`]. Streamed output arrives in arbitrary pieces,
//! so [`Masker::safe_cut`] tells the caller how much of a pending buffer can be
//! masked and emitted now without risking that a secret is split across two
//! emitted pieces (and so escapes masking).

use aviary_core::model::MASK;
use serde_json::Value;

/// Masks a fixed set of secret values in bytes, text and JSON values.
#[derive(Debug, Clone, Default)]
pub(crate) struct Masker {
    /// Non-empty secrets, longest first (so the longest match wins).
    secrets: Vec<Vec<u8>>,
    /// Length of the longest secret (0 when there are none).
    max_len: usize,
}

impl Masker {
    /// Builds a masker; empty secrets are ignored, duplicates merged.
    pub(crate) fn new(secrets: &[String]) -> Self {
        let mut list: Vec<Vec<u8>> = secrets
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| s.as_bytes().to_vec())
            .collect();
        list.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        list.dedup();
        let max_len = list.first().map_or(0, Vec::len);
        Self {
            secrets: list,
            max_len,
        }
    }

    /// True when there is nothing to mask.
    pub(crate) fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// The secret matching at the start of `data`, if any (longest first).
    fn match_at(&self, data: &[u8]) -> Option<usize> {
        self.secrets
            .iter()
            .find(|s| data.starts_with(s))
            .map(Vec::len)
    }

    /// Non-overlapping, leftmost (longest at a position) matches as `(start, end)`.
    fn matches(&self, data: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        if self.is_empty() {
            return out;
        }
        let mut i = 0;
        while i < data.len() {
            match self.match_at(&data[i..]) {
                Some(len) => {
                    out.push((i, i + len));
                    i += len;
                }
                None => i += 1,
            }
        }
        out
    }

    /// Replaces every secret occurrence in `data` with the mask.
    pub(crate) fn mask_bytes(&self, data: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return data.to_vec();
        }
        let mut out = Vec::with_capacity(data.len());
        let mut last = 0;
        for (start, end) in self.matches(data) {
            out.extend_from_slice(&data[last..start]);
            out.extend_from_slice(MASK.as_bytes());
            last = end;
        }
        out.extend_from_slice(&data[last..]);
        out
    }

    /// Replaces every secret occurrence in `text` with the mask.
    pub(crate) fn mask_str(&self, text: &str) -> String {
        if self.is_empty() {
            return text.to_owned();
        }
        // Secrets are valid UTF-8 and start on character boundaries when they
        // match, so the masked bytes stay valid UTF-8.
        String::from_utf8_lossy(&self.mask_bytes(text.as_bytes())).into_owned()
    }

    /// Masks every string (and object key) inside a JSON value.
    pub(crate) fn mask_json(&self, value: Value) -> Value {
        if self.is_empty() {
            return value;
        }
        match value {
            Value::String(s) => Value::String(self.mask_str(&s)),
            Value::Array(items) => {
                Value::Array(items.into_iter().map(|v| self.mask_json(v)).collect())
            }
            Value::Object(map) => Value::Object(
                map.into_iter()
                    .map(|(k, v)| (self.mask_str(&k), self.mask_json(v)))
                    .collect(),
            ),
            other => other,
        }
    }

    /// Largest cut `<= cut` such that masking `data[..cut]` now and the rest
    /// later (after more data arrives) masks every secret: no secret match in
    /// `data` straddles the cut, and no secret could start before the cut and
    /// be completed by data not yet received.
    pub(crate) fn safe_cut(&self, data: &[u8], cut: usize) -> usize {
        let mut cut = cut.min(data.len());
        if self.is_empty() {
            return cut;
        }
        // A suffix of `data` that is a proper prefix of a secret may become a
        // secret once more bytes arrive: hold it back.
        let from = data.len().saturating_sub(self.max_len.saturating_sub(1));
        for p in from..data.len() {
            let tail = &data[p..];
            if self
                .secrets
                .iter()
                .any(|s| s.len() > tail.len() && s.starts_with(tail))
            {
                cut = cut.min(p);
                break;
            }
        }
        // A complete match must not be split either.
        for (start, end) in self.matches(data) {
            if start < cut && cut < end {
                cut = start;
                break;
            }
            if start >= cut {
                break;
            }
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_all_occurrences_longest_first() {
        let m = Masker::new(&["ab".into(), "abc".into(), String::new()]);
        assert_eq!(m.mask_str("xabcyab"), format!("x{MASK}y{MASK}"));
    }

    #[test]
    fn one_char_secret() {
        let m = Masker::new(&["k".into()]);
        assert_eq!(m.mask_str("kok"), format!("{MASK}o{MASK}"));
    }

    #[test]
    fn safe_cut_holds_back_secret_prefix() {
        let m = Masker::new(&["hunter2".into()]);
        let data = b"line hun";
        assert_eq!(m.safe_cut(data, data.len()), 5);
        // A complete match is not split.
        let data = b"a hunter2 b";
        assert_eq!(m.safe_cut(data, 5), 2);
        assert_eq!(m.safe_cut(data, 9), 9);
    }

    #[test]
    fn masks_json_strings_and_keys() {
        let m = Masker::new(&["s3cr\"t".into()]);
        let v = serde_json::json!({"a": ["s3cr\"t", 1], "s3cr\"t": true});
        let masked = m.mask_json(v);
        assert_eq!(masked, serde_json::json!({"a": [MASK, 1], MASK: true}));
    }
}
