//! An incremental reader of server-sent events: bytes in, as they arrive, and the `data` of
//! each completed event out. Only `data` matters to the load generator; other fields and
//! comments are skipped.

/// A line longer than this ends the stream as malformed rather than growing without bound.
pub const MAX_LINE_BYTES: usize = 16 << 20;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("an event-stream line is longer than {MAX_LINE_BYTES} bytes")]
pub struct LineTooLong;

#[derive(Debug, Default)]
pub struct SseReader {
    /// The bytes of the line not yet ended.
    line: Vec<u8>,
    /// The data lines of the event not yet ended, joined by newlines.
    data: Option<String>,
}

impl SseReader {
    /// Feeds the next bytes of the stream and returns the data of every event they complete,
    /// in order.
    pub fn push(&mut self, bytes: &[u8]) -> Result<Vec<String>, LineTooLong> {
        let mut events = Vec::new();
        let mut rest = bytes;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            self.line.extend_from_slice(&rest[..at]);
            rest = &rest[at + 1..];
            let line = std::mem::take(&mut self.line);
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if let Some(data) = self.end_line(line) {
                events.push(data);
            }
        }
        if self.line.len() + rest.len() > MAX_LINE_BYTES {
            return Err(LineTooLong);
        }
        self.line.extend_from_slice(rest);
        Ok(events)
    }

    /// Handles one whole line; an empty line ends the event.
    fn end_line(&mut self, line: &[u8]) -> Option<String> {
        if line.is_empty() {
            return self.data.take();
        }
        let value = line.strip_prefix(b"data")?;
        let value = match value {
            [] => &[][..],
            [b':', rest @ ..] => rest.strip_prefix(b" ").unwrap_or(rest),
            // Another field whose name starts with "data".
            _ => return None,
        };
        let value = String::from_utf8_lossy(value);
        match &mut self.data {
            Some(data) => {
                data.push('\n');
                data.push_str(&value);
            }
            None => self.data = Some(value.into_owned()),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_reassemble() {
        let stream = b"data: {\"a\":1}\n\n: comment\nevent: x\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            let mut reader = SseReader::default();
            let mut events = reader.push(&stream[..cut]).unwrap();
            events.extend(reader.push(&stream[cut..]).unwrap());
            assert_eq!(events, ["{\"a\":1}", "[DONE]"], "cut at {cut}");
        }
    }

    #[test]
    fn crlf_multiline_and_bare_data() {
        let mut reader = SseReader::default();
        let events = reader
            .push(b"data:one\r\ndata: two\r\n\r\ndata\n\ndatum: no\n\n")
            .unwrap();
        assert_eq!(events, ["one\ntwo", ""]);
        assert_eq!(
            reader.push(b"data: unfinished").unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn an_endless_line_is_an_error() {
        let mut reader = SseReader::default();
        let chunk = vec![b'x'; MAX_LINE_BYTES / 2 + 1];
        assert!(reader.push(&chunk).is_ok());
        assert_eq!(reader.push(&chunk), Err(LineTooLong));
    }
}
