//! Generated text, decoded as tokens arrive. Each token decodes only a short window (the
//! tokens since the last complete piece and the piece before, for context), so a long answer
//! costs the same per token as a short one, where decoding everything each time grows with it.

use models::runtime::Tokenizer;

#[derive(Debug, Default)]
pub(super) struct Detokenizer {
    text: String,
    /// Start of the window: the previous piece's tokens, which give the next one its context
    /// (a leading space, say).
    prefix_offset: usize,
    /// Tokens before this are in `text`.
    read_offset: usize,
}

impl Detokenizer {
    /// The text of the generated tokens so far, without a trailing character whose bytes
    /// have not all arrived.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Adds what the tokens after the last call complete; `generated` is every generated id.
    pub fn update(&mut self, tokenizer: &Tokenizer, generated: &[u32]) -> Result<(), String> {
        let decode = |ids: &[u32]| tokenizer.decode(ids, true).map_err(|e| e.to_string());
        let before = decode(&generated[self.prefix_offset..self.read_offset])?;
        let now = decode(&generated[self.prefix_offset..])?;
        if now.ends_with('\u{FFFD}') || now.len() <= before.len() {
            // An incomplete character, or a token without text (yet).
            return Ok(());
        }
        if now.starts_with(&before) {
            self.text.push_str(&now[before.len()..]);
        } else {
            // The window's context changed how its start decodes: start over from the whole.
            self.text = decode(generated)?;
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = generated.len();
        Ok(())
    }

    /// Takes in every token, incomplete characters too (the generation has ended).
    pub fn flush(&mut self, tokenizer: &Tokenizer, generated: &[u32]) -> Result<(), String> {
        if self.read_offset < generated.len() {
            let whole = tokenizer
                .decode(generated, true)
                .map_err(|e| e.to_string())?;
            if whole.starts_with(&self.text) {
                self.text = whole;
            } else {
                self.text
                    .push_str(&whole[whole.len().min(self.text.len())..]);
            }
            self.read_offset = generated.len();
        }
        Ok(())
    }
}
