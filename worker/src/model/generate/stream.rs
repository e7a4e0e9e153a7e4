//! The text of one row as its tokens arrive: incremental decoding that never
//! emits half a UTF-8 character (byte-level BPE and SentencePiece byte
//! fallback split characters over several tokens), and stop strings checked on
//! the decoded text, held back while they might still be completing.

use crate::tokenizer::Tokenizer;
use anyhow::Result;

/// Decoded text of a growing token sequence.
#[derive(Debug, Default)]
pub struct TextStream {
    ids: Vec<u32>,
    /// Decoding restarts from `prefix` (a few tokens of context, so that
    /// tokenizers which strip a leading space decode the join correctly) and
    /// `read` is where the text already appended ends.
    prefix: usize,
    read: usize,
    /// Complete text so far (no partial characters).
    text: String,
    /// Bytes of `text` handed out through `on_token`.
    emitted: usize,
}

/// What one new token did to a row's text.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// New text that is safe to show (may be empty).
    Text(String),
    /// A stop string appeared: the text before it, not shown yet. The row is done.
    Stopped(String),
}

impl TextStream {
    /// Appends `id`, checks `stops`, and returns the text that became final.
    pub fn push(&mut self, tok: &Tokenizer, id: u32, stops: &[String]) -> Result<Step> {
        self.ids.push(id);
        // TGI's incremental decode: text of ids[prefix..] minus ids[prefix..read].
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') {
            if let Some(added) = now.get(before.len()..) {
                self.text.push_str(added);
                self.prefix = self.read;
                self.read = self.ids.len();
            }
        }
        // A stop string may end in the new text only; search from where it could start.
        let longest = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            let rest = self
                .text
                .get(self.emitted.min(at)..)
                .unwrap_or("")
                .to_string();
            self.emitted = self.text.len();
            return Ok(Step::Stopped(rest));
        }
        // Hold back a tail that could still grow into a stop string.
        let mut safe = self.text.len() - held_back(&self.text, stops);
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let out = if safe > self.emitted {
            self.text[self.emitted..safe].to_string()
        } else {
            String::new()
        };
        self.emitted = self.emitted.max(safe);
        Ok(Step::Text(out))
    }

    /// At the end (EOS or length): everything not yet emitted.
    pub fn finish(&mut self) -> String {
        let rest = self.text[self.emitted..].to_string();
        self.emitted = self.text.len();
        rest
    }

    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Bytes at the end of `text` that are a proper prefix of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut held = 0;
    for s in stops {
        for n in (1..s.len()).rev() {
            if n <= held {
                break;
            }
            if text.as_bytes().ends_with(&s.as_bytes()[..n]) {
                held = n;
                break;
            }
        }
    }
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_back_is_the_longest_partial_stop() {
        let stops = vec!["</s>".to_string(), "##".to_string()];
        assert_eq!(held_back("abc</", &stops), 2);
        assert_eq!(held_back("abc#", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("abc</s>", &stops), 0); // whole: found, not held
    }
}
