//! The `ar` container of a .deb, in the common format `dpkg-deb` writes:
//! global header `!<arch>\n`, then 60-byte member headers (name padded to 16,
//! mtime, uid 0, gid 0, mode 100644, decimal size, `` `\n ``), data padded to
//! an even length with `\n`.

use std::io::{self, Write};

/// The global ar header.
pub const MAGIC: &[u8; 8] = b"!<arch>\n";

/// Builds the 60-byte header of a member called `name` (at most 15 bytes).
pub fn member_header(name: &str, mtime: u64, size: u64) -> io::Result<[u8; 60]> {
    if name.len() > 15 || name.contains([' ', '/']) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ar member name {name:?} does not fit the common format"),
        ));
    }
    let text = format!(
        "{name:<16}{mtime:<12}{uid:<6}{gid:<6}{mode:<8o}{size:<10}`\n",
        uid = 0,
        gid = 0,
        mode = 0o100644
    );
    let bytes = text.as_bytes();
    if bytes.len() != 60 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("ar member {name:?}: mtime or size too large for the ar header"),
        ));
    }
    let mut h = [0u8; 60];
    h.copy_from_slice(bytes);
    Ok(h)
}

/// Writes a complete member (header, data, padding) from memory.
pub fn write_member<W: Write>(out: &mut W, name: &str, mtime: u64, data: &[u8]) -> io::Result<()> {
    out.write_all(&member_header(name, mtime, data.len() as u64)?)?;
    out.write_all(data)?;
    if data.len() % 2 == 1 {
        out.write_all(b"\n")?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_layout() {
        let h = member_header("debian-binary", 1_700_000_000, 4).unwrap();
        assert_eq!(
            &h[..],
            b"debian-binary   1700000000  0     0     100644  4         `\n"
        );
        assert!(member_header("a-name-that-is-too-long", 0, 0).is_err());
    }
}
