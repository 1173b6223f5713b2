//! Text of bounded size, for a core that has no heap.
//!
//! Everything the dongle writes as text (CLI answers, its link description, the text quoted in an
//! error) has a capacity fixed at compile time. What does not fit is cut, never refused with a
//! panic: the CLI marks a cut answer as truncated, and a quoted input is only there to help a
//! reader.

use core::fmt;

/// A UTF-8 string of at most `N` bytes.
pub type Text<const N: usize> = heapless::String<N>;

/// `s`, cut to at most `N` bytes at a character boundary.
pub fn bounded<const N: usize>(s: &str) -> Text<N> {
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut text = Text::new();
    // Cannot fail: `end` is at most N.
    let _ = text.push_str(&s[..end]);
    text
}

/// The longest prefix of `bytes` that is valid UTF-8: output cut in the middle of a character
/// loses that character rather than all of it.
pub fn utf8_prefix(bytes: &[u8]) -> &str {
    match core::str::from_utf8(bytes) {
        Ok(s) => s,
        // `valid_up_to` is a character boundary, so the second conversion cannot fail.
        Err(e) => core::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
    }
}

/// Bytes written with `write!` into a buffer of `N` bytes. A write that does not fit stores what
/// fits and drops the rest; [`Self::is_full`] then tells that something may have been dropped.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Written<const N: usize> {
    bytes: heapless::Vec<u8, N>,
}

impl<const N: usize> Written<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        Self {
            bytes: heapless::Vec::new(),
        }
    }

    /// What was written.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// What was written, as text (see [`utf8_prefix`]: a character cut at the end is left out).
    pub fn as_str(&self) -> &str {
        utf8_prefix(&self.bytes)
    }

    /// Whether the buffer holds `N` bytes: a longer write was cut.
    pub fn is_full(&self) -> bool {
        self.bytes.len() == N
    }
}

impl<const N: usize> From<&str> for Written<N> {
    fn from(s: &str) -> Self {
        let mut w = Self::new();
        let _ = fmt::Write::write_str(&mut w, s);
        w
    }
}

impl<const N: usize> fmt::Write for Written<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = N - self.bytes.len();
        let take = s.len().min(room);
        // Cannot fail: `take` bytes fit.
        let _ = self.bytes.extend_from_slice(&s.as_bytes()[..take]);
        // The rest is dropped without an error, so that one `write!` that overflows still stores
        // its beginning and the caller's formatting goes on.
        Ok(())
    }
}

impl<const N: usize> fmt::Debug for Written<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl<const N: usize> PartialEq<&str> for Written<N> {
    fn eq(&self, other: &&str) -> bool {
        self.bytes == other.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn bounded_cuts_at_a_character_boundary() {
        assert_eq!(bounded::<4>("abcdef").as_str(), "abcd");
        // "é" is two bytes: cutting after three bytes would split it.
        assert_eq!(bounded::<3>("aéb").as_str(), "aé");
        assert_eq!(bounded::<2>("aéb").as_str(), "a");
        assert_eq!(bounded::<8>("ab").as_str(), "ab");
    }

    #[test]
    fn a_write_past_the_end_keeps_what_fits_and_reports_full() {
        let mut w = Written::<5>::new();
        write!(w, "{}", 123).unwrap();
        assert!(!w.is_full());
        w.write_str("4567").unwrap();
        assert_eq!(w, "12345");
        assert!(w.is_full());
    }

    #[test]
    fn a_character_cut_at_the_end_is_left_out_of_the_text() {
        let w = Written::<2>::from("aé");
        assert_eq!(w.as_bytes(), b"a\xc3");
        assert_eq!(w.as_str(), "a");
    }
}
