//! The text form of a model without a vocabulary: each token is its id in angle brackets,
//! tokens separated by one space (`<12> <7>`). It renders any ids and reads back only that
//! form, so a random-weights model can be served and its answers compared as ids.

use super::RuntimeError;

/// `<12> <7>` for `[12, 7]`; empty for no tokens.
pub(crate) fn render(ids: &[u32]) -> String {
    let mut text = String::with_capacity(ids.len() * 7);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            text.push(' ');
        }
        text.push('<');
        text.push_str(&id.to_string());
        text.push('>');
    }
    text
}

/// The ids written in `text` (whitespace-separated `<N>`, each below `vocab_size`).
pub(crate) fn parse(text: &str, vocab_size: u32) -> Result<Vec<u32>, RuntimeError> {
    text.split_whitespace()
        .map(|word| {
            let id = word
                .strip_prefix('<')
                .and_then(|w| w.strip_suffix('>'))
                .and_then(|n| n.parse::<u32>().ok())
                .ok_or_else(|| {
                    RuntimeError::Invalid(format!(
                        "this model has no vocabulary: its text is token ids written `<12> <7>`, \
                         found `{word}`"
                    ))
                })?;
            if id >= vocab_size {
                return Err(RuntimeError::Invalid(format!(
                    "token id {id} is outside the {vocab_size}-token vocabulary"
                )));
            }
            Ok(id)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::runtime::Tokenizer;

    #[test]
    fn ids_render_and_read_back() {
        let t = Tokenizer::token_ids(100);
        assert_eq!(t.vocab_size(), 100);
        assert_eq!(t.decode(&[12, 7, 0], true).unwrap(), "<12> <7> <0>");
        assert_eq!(t.decode(&[], true).unwrap(), "");
        assert_eq!(t.encode("<12> <7>\n<0>", true).unwrap(), vec![12, 7, 0]);
        assert_eq!(t.encode("", true).unwrap(), Vec::<u32>::new());
        assert_eq!(t.token_to_id("<99>"), Some(99));
        assert_eq!(t.token_to_id("<100>"), None);
        assert!(t.eos_token_ids().is_empty());
        assert_eq!(t.chat_template(), None);
    }

    #[test]
    fn text_that_is_not_ids_is_refused_by_name() {
        let t = Tokenizer::token_ids(100);
        let e = t.encode("<1> hello", false).unwrap_err().to_string();
        assert!(e.contains("no vocabulary") && e.contains("`hello`"), "{e}");
        let e = t.encode("<100>", false).unwrap_err().to_string();
        assert!(e.contains("token id 100 is outside"), "{e}");
        let e = t.decode(&[3, 100], true).unwrap_err().to_string();
        assert!(e.contains("100"), "{e}");
    }

    #[test]
    fn growing_answers_decode_as_prefixes() {
        // Incremental detokenization appends what each longer prefix adds.
        let t = Tokenizer::token_ids(50);
        let ids = [4, 40, 2, 17];
        for n in 1..ids.len() {
            let shorter = t.decode(&ids[..n], true).unwrap();
            let longer = t.decode(&ids[..n + 1], true).unwrap();
            assert!(longer.starts_with(&shorter), "{shorter} / {longer}");
        }
    }
}
