//! An incremental parser for the server-sent event stream of `GET /v1/watch`.
//!
//! The node sends `event:` / `data:` lines separated by blank lines and `:` comment lines as
//! keep-alives. Bytes arrive in arbitrary chunks, so the parser keeps the unfinished line
//! between calls, and it bounds that line so a misbehaving server cannot grow it without end.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// The `event:` field, `message` when the event named none.
    pub(crate) event: String,
    /// The `data:` lines joined with `\n`.
    pub(crate) data: String,
    /// The `id:` field, when the event set one (the feed's sequence number).
    pub(crate) id: Option<String>,
}

/// Incremental SSE parser (the subset of the WHATWG rules that matters to a client here:
/// `event`, `data`, comments, and all three line endings).
#[derive(Debug)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    event: String,
    data: String,
    id: Option<String>,
    has_data: bool,
    /// The previous byte was `\r`, so a following `\n` belongs to the same line break.
    after_cr: bool,
    max_line: usize,
}

impl SseParser {
    /// A parser that rejects lines (and events) longer than `max_line` bytes.
    pub(crate) fn new(max_line: usize) -> Self {
        Self {
            line: Vec::new(),
            event: String::new(),
            data: String::new(),
            id: None,
            has_data: false,
            after_cr: false,
            max_line,
        }
    }

    /// Feeds a chunk of the stream; returns the events it completed.
    pub(crate) fn push(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, String> {
        let mut events = Vec::new();
        for &b in chunk {
            if self.after_cr {
                self.after_cr = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\n' | b'\r' => {
                    self.after_cr = b == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&line)? {
                        events.push(event);
                    }
                }
                _ => {
                    if self.line.len() >= self.max_line {
                        return Err(format!(
                            "an event stream line is longer than {} bytes",
                            self.max_line
                        ));
                    }
                    self.line.push(b);
                }
            }
        }
        Ok(events)
    }

    fn line_done(&mut self, line: &[u8]) -> Result<Option<SseEvent>, String> {
        if line.is_empty() {
            let event = std::mem::take(&mut self.event);
            let data = std::mem::take(&mut self.data);
            let id = self.id.take();
            let had_data = std::mem::replace(&mut self.has_data, false);
            if !had_data {
                return Ok(None);
            }
            let event = if event.is_empty() {
                "message".to_owned()
            } else {
                event
            };
            return Ok(Some(SseEvent { event, data, id }));
        }
        if line.first() == Some(&b':') {
            return Ok(None);
        }
        let line = String::from_utf8_lossy(line);
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => value.clone_into(&mut self.event),
            // A NUL in an id is ignored, as browsers do.
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                if self.data.len() + value.len() > self.max_line {
                    return Err(format!(
                        "an event's data is longer than {} bytes",
                        self.max_line
                    ));
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_owned(),
            data: data.to_owned(),
            id: None,
        }
    }

    #[test]
    fn parses_events_and_skips_comments() {
        let mut p = SseParser::new(1024);
        let got = p
            .push(b": keep-alive\n\nid: 7\nevent: change\ndata: {\"id\":\"a\"}\n\nevent: reset\ndata: {\"last\":3}\n\n")
            .expect("valid stream");
        assert_eq!(
            got,
            vec![
                SseEvent {
                    id: Some("7".into()),
                    ..ev("change", "{\"id\":\"a\"}")
                },
                ev("reset", "{\"last\":3}")
            ]
        );
    }

    #[test]
    fn handles_split_chunks_and_crlf() {
        let mut p = SseParser::new(1024);
        let stream = b"event: change\r\ndata: x\r\ndata:y\r\n\r\ndata: z\r\r";
        let mut got = Vec::new();
        for chunk in stream.chunks(1) {
            got.extend(p.push(chunk).expect("valid stream"));
        }
        assert_eq!(got, vec![ev("change", "x\ny"), ev("message", "z")]);
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        let mut p = SseParser::new(1024);
        assert!(p.push(b"event: change\n\n").expect("valid").is_empty());
        // And the event name does not leak into the next event.
        assert_eq!(
            p.push(b"data: 1\n\n").expect("valid"),
            vec![ev("message", "1")]
        );
    }

    #[test]
    fn bounds_long_lines() {
        let mut p = SseParser::new(8);
        assert!(p.push(b"data: 0123456789").is_err());
        // Each line fits, but together they do not.
        let mut p = SseParser::new(11);
        assert!(p.push(b"data:123456\n").is_ok());
        assert!(p.push(b"data:123456\n").is_err());
    }
}
