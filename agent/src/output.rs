//! Bounded capture of what hooks print: however much a hook writes, the
//! agent keeps the last [`KEEP_BYTES`] of it, cuts long lines, and says how
//! much it dropped, so a chatty or hostile hook can neither grow the agent's
//! memory nor make a CommandUpdate too large to send.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of output kept (the tail).
pub const KEEP_BYTES: usize = 64 * 1024;
/// Characters kept of one line.
pub const MAX_LINE_CHARS: usize = 512;

/// The tail of a byte stream, with a count of what fell off the front.
#[derive(Debug, Default)]
pub struct BoundedTail {
    buf: std::collections::VecDeque<u8>,
    dropped: u64,
}

impl BoundedTail {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend(bytes);
        let over = self.buf.len().saturating_sub(KEEP_BYTES);
        if over > 0 {
            self.buf.drain(..over);
            self.dropped += over as u64;
        }
    }

    /// Reads `reader` to its end into the tail.
    pub async fn read_all(&mut self, mut reader: impl AsyncRead + Unpin) -> std::io::Result<()> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            let n = reader.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            self.push(&chunk[..n]);
        }
    }

    /// The last `lines` lines, each cut to [`MAX_LINE_CHARS`], after a note
    /// of what was dropped.
    pub fn render(&self, lines: usize) -> String {
        let bytes: Vec<u8> = self.buf.iter().copied().collect();
        let text = String::from_utf8_lossy(&bytes);
        let all: Vec<&str> = text.lines().collect();
        let kept = &all[all.len().saturating_sub(lines)..];
        let mut out = String::new();
        let earlier = (all.len() - kept.len()) as u64;
        if self.dropped > 0 || earlier > 0 {
            out.push_str(&format!(
                "[output truncated: {} earlier bytes and {earlier} earlier lines not shown]\n",
                self.dropped
            ));
        }
        for line in kept {
            if line.chars().count() > MAX_LINE_CHARS {
                let cut: String = line.chars().take(MAX_LINE_CHARS).collect();
                out.push_str(&format!(
                    "{cut}… [{} more characters]\n",
                    line.chars().count() - MAX_LINE_CHARS
                ));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out.truncate(out.trim_end_matches('\n').len());
        out
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_tail_cuts_long_lines_and_says_so() {
        let mut t = BoundedTail::default();
        for i in 0..20 {
            t.push(format!("line {i} ").as_bytes());
            t.push(&vec![b'x'; 200_000]);
            t.push(b"\n");
        }
        assert!(t.dropped() > 3_000_000);
        let text = t.render(20);
        assert!(text.len() < 4 * 1024, "{}", text.len());
        assert!(text.starts_with("[output truncated: "), "{text}");
        assert!(text.contains("more characters]"), "{text}");
        let mut small = BoundedTail::default();
        small.push(b"one\ntwo\nthree\n");
        assert_eq!(
            small.render(2),
            "[output truncated: 0 earlier bytes and 1 earlier lines not shown]\ntwo\nthree"
        );
        assert_eq!(small.render(5), "one\ntwo\nthree");
    }
}
