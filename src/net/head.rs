//! Where a connection is in its request cycle, as seen from its bytes:
//! enough to know when a request head starts and ends (HTTP/1.1), and when
//! a header block is open (HTTP/2), without parsing more than that.

/// A connection's place in its request cycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Accepted, nothing read yet: the first request must arrive within the
    /// head deadline.
    Fresh,
    /// The first bytes match the start of the HTTP/2 preface this far: the
    /// protocol is decided once all of it arrived or a byte differs.
    Sniff(usize),
    /// Between requests: waiting is the idle timeout's business.
    Idle,
    /// A request head has started: it must end within the deadline.
    Head { read: usize, tail: [u8; 3] },
    /// The head is complete; the body and response follow.
    Rest,
    /// HTTP/2, with its frame reader.
    H2(H2Frames),
}

pub(super) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Phase {
    pub(super) fn head() -> Phase {
        Phase::Head {
            read: 0,
            tail: [0; 3],
        }
    }

    /// Whether the head deadline applies: a request that has not arrived
    /// or whose headers have not ended.
    pub(super) fn waits_for_headers(&self) -> bool {
        match self {
            Phase::Fresh | Phase::Sniff(_) | Phase::Head { .. } => true,
            Phase::H2(f) => !f.seen_request || f.open_block,
            Phase::Idle | Phase::Rest => false,
        }
    }

    /// Feeds newly read bytes; `Err` when an HTTP/1.1 head is too large.
    pub(super) fn advance(self, bytes: &[u8], max: usize) -> Result<Phase, ()> {
        match self {
            Phase::Head { read, tail } => advance_head(read, tail, bytes, max),
            Phase::H2(frames) => Ok(Phase::H2(frames.feed(bytes))),
            other => Ok(other),
        }
    }
}

fn advance_head(mut read: usize, mut tail: [u8; 3], bytes: &[u8], max: usize) -> Result<Phase, ()> {
    for b in bytes {
        if tail == [b'\r', b'\n', b'\r'] && *b == b'\n' {
            return Ok(Phase::Rest);
        }
        tail = [tail[1], tail[2], *b];
        read += 1;
        if read > max {
            return Err(());
        }
    }
    Ok(Phase::Head { read, tail })
}

/// A response head being written ends the request: the next bytes read
/// start another head. An interim `100 Continue` does not: the body follows.
/// `true` when the connection became idle.
pub(super) fn end_of_request(phase: &mut Phase, written: &[u8]) -> bool {
    if *phase == Phase::Rest && !written.starts_with(b"HTTP/1.1 1") {
        *phase = Phase::Idle;
        return true;
    }
    false
}

/// An HTTP/2 frame reader that tracks header blocks: a HEADERS frame
/// without END_HEADERS opens one, which stays open until a CONTINUATION
/// frame carries that flag (RFC 9113 §6.2, §6.10).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct H2Frames {
    /// Bytes of the client preface still to pass.
    preface_left: usize,
    /// The frame header being read.
    header: [u8; 9],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: usize,
    pub(super) open_block: bool,
    /// A header block (a request) has been completed at least once.
    pub(super) seen_request: bool,
}

const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

impl H2Frames {
    /// A reader whose first `seen` preface bytes were already read.
    pub(super) fn after(seen: usize) -> Self {
        Self {
            preface_left: H2_PREFACE.len().saturating_sub(seen),
            header: [0; 9],
            have: 0,
            payload_left: 0,
            open_block: false,
            seen_request: false,
        }
    }

    fn feed(mut self, bytes: &[u8]) -> Self {
        let mut i = 0;
        while i < bytes.len() {
            let left = bytes.len() - i;
            if self.preface_left > 0 {
                let n = self.preface_left.min(left);
                self.preface_left -= n;
                i += n;
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(left);
                self.payload_left -= n;
                i += n;
            } else {
                self.header[self.have] = bytes[i];
                self.have += 1;
                i += 1;
                if self.have == self.header.len() {
                    self.have = 0;
                    self.frame_header();
                }
            }
        }
        self
    }

    fn frame_header(&mut self) {
        let h = self.header;
        self.payload_left = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        if matches!(h[3], HEADERS | PUSH_PROMISE | CONTINUATION) {
            let ended = h[4] & END_HEADERS != 0;
            self.open_block = !ended;
            self.seen_request |= ended;
        }
    }
}

/// The answer to a request head over the limit, written on the raw stream
/// before the connection closes: a 431 in the one error body.
pub(super) const HEADERS_TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
content-type: application/json; charset=utf-8\r\nconnection: close\r\ncontent-length: 159\r\n\r\n\
{\"status\":\"error\",\"error\":\"HEADERS_TOO_LARGE\",\"error_code\":\"HEADERS_TOO_LARGE\",\
\"message\":\"the request headers are larger than the server accepts\",\"details\":{}}";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_end_of_a_head_is_found_across_reads() {
        let p = Phase::head()
            .advance(b"GET / HTTP/1.1\r\nHost: x\r", 1000)
            .unwrap();
        assert!(matches!(p, Phase::Head { .. }));
        let p = p.advance(b"\n\r", 1000).unwrap();
        assert!(matches!(p, Phase::Head { .. }));
        assert_eq!(p.advance(b"\nbody", 1000), Ok(Phase::Rest));
    }

    #[test]
    fn the_431_body_is_the_one_error_body_with_its_length() {
        let text = std::str::from_utf8(HEADERS_TOO_LARGE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"], "HEADERS_TOO_LARGE");
    }

    #[test]
    fn an_oversized_head_is_refused() {
        assert!(Phase::head().advance(&[b'a'; 100], 50).is_err());
        assert!(Phase::head().advance(&[b'a'; 40], 50).is_ok());
    }

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&1u32.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn an_http2_header_block_is_open_until_end_headers_in_any_split() {
        let mut bytes = H2_PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, &[0; 6])); // SETTINGS
        let settings_end = bytes.len();
        bytes.extend(frame(HEADERS, 0, &[7; 20]));
        let open_end = bytes.len();
        bytes.extend(frame(CONTINUATION, END_HEADERS, &[7; 5]));
        for split in 0..bytes.len() {
            let p = Phase::H2(H2Frames::after(0));
            let p = p.advance(&bytes[..split], 0).unwrap();
            let Phase::H2(f) = p else { unreachable!() };
            assert_eq!(
                f.open_block,
                (settings_end + 9..open_end + 9).contains(&split),
                "{split}"
            );
            assert_eq!(p.waits_for_headers(), split < open_end + 9, "{split}");
            let Phase::H2(f) = p.advance(&bytes[split..], 0).unwrap() else {
                unreachable!()
            };
            assert!(f.seen_request && !f.open_block, "{split}");
            assert!(!Phase::H2(f).waits_for_headers());
        }
    }
}

/// The phase after a connection's first bytes (`matched` of them, read
/// before, matched the HTTP/2 preface): HTTP/2 only once the whole preface
/// has arrived, HTTP/1.1 as soon as a byte differs, still undecided
/// otherwise. The caller then feeds `new` to the phase returned.
pub(super) fn sniff(matched: usize, new: &[u8]) -> Phase {
    let want = &H2_PREFACE[matched..];
    let n = new.len().min(want.len());
    if new[..n] != want[..n] {
        Phase::head()
    } else if matched + n == H2_PREFACE.len() {
        Phase::H2(H2Frames::after(matched))
    } else {
        Phase::Sniff(matched + n)
    }
}

#[cfg(test)]
mod sniff_tests {
    use super::*;

    #[test]
    fn http2_is_decided_by_the_whole_preface_not_its_first_byte() {
        // One byte of the preface decides nothing.
        assert_eq!(sniff(0, b"P"), Phase::Sniff(1));
        // Then HTTP/1.1 after all: a head, under the head deadline.
        assert_eq!(sniff(1, b"OST /x HTTP/1.1\r\n"), Phase::head());
        // The preface in pieces.
        assert_eq!(sniff(0, &H2_PREFACE[..10]), Phase::Sniff(10));
        let Phase::H2(f) = sniff(10, &H2_PREFACE[10..]) else {
            panic!("the whole preface is HTTP/2")
        };
        assert_eq!(f.preface_left, H2_PREFACE.len() - 10);
        assert!(Phase::Sniff(3).waits_for_headers());
    }
}
