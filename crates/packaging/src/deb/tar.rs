//! A minimal, deterministic tar writer in GNU format (what `dpkg-deb -b`
//! writes): 512-byte headers, `././@LongLink` entries for names or link
//! targets longer than 100 bytes, base-256 sizes above 8 GiB, owner
//! root:root (uid/gid 0), one fixed mtime, no padding to a 10 KiB record.

use std::io::{self, Read, Write};

/// Size of a tar block.
const BLOCK: usize = 512;

/// Kind of a tar entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory (name ends with `/`).
    Dir,
    /// A symbolic link.
    Symlink,
}

/// Writes a tar stream to `W`.
pub struct TarWriter<W: Write> {
    out: W,
    mtime: u64,
}

impl<W: Write> TarWriter<W> {
    /// A writer stamping every entry with `mtime` (seconds since the epoch).
    pub fn new(out: W, mtime: u64) -> Self {
        TarWriter { out, mtime }
    }

    /// Writes a directory entry; `name` should end with `/` (e.g. `./opt/`).
    pub fn dir(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.header(name, EntryKind::Dir, mode, 0, "")
    }

    /// Writes a symlink entry pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.header(name, EntryKind::Symlink, 0o777, 0, target)
    }

    /// Writes a regular file from memory.
    pub fn file_bytes(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.header(name, EntryKind::File, mode, data.len() as u64, "")?;
        self.out.write_all(data)?;
        self.pad(data.len() as u64)
    }

    /// Writes a regular file of exactly `size` bytes read from `reader`,
    /// passing every chunk to `inspect` (used for MD5 sums). Fails if the
    /// reader yields a different number of bytes (the file changed).
    pub fn file_from<R: Read>(
        &mut self,
        name: &str,
        mode: u32,
        size: u64,
        reader: &mut R,
        buf: &mut [u8],
        mut inspect: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        self.header(name, EntryKind::File, mode, size, "")?;
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = reader.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while it was being packaged",
                ));
            }
            inspect(&buf[..n]);
            self.out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        let mut probe = [0u8; 1];
        if reader.read(&mut probe)? != 0 {
            return Err(io::Error::other("file grew while it was being packaged"));
        }
        self.pad(size)
    }

    /// Writes the end-of-archive marker and returns the inner writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; BLOCK * 2])?;
        Ok(self.out)
    }

    /// Pads the data of an entry of `size` bytes to a block boundary.
    fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
        }
        Ok(())
    }

    /// Writes a header (preceded by GNU long-name/long-link entries if needed).
    fn header(
        &mut self,
        name: &str,
        kind: EntryKind,
        mode: u32,
        size: u64,
        link: &str,
    ) -> io::Result<()> {
        if link.len() > 100 {
            self.long_entry(b'K', link)?;
        }
        if name.len() > 100 {
            self.long_entry(b'L', name)?;
        }
        let typeflag = match kind {
            EntryKind::File => b'0',
            EntryKind::Dir => b'5',
            EntryKind::Symlink => b'2',
        };
        let block = build_header(
            truncate(name.as_bytes(), 100),
            mode,
            size,
            self.mtime,
            typeflag,
            truncate(link.as_bytes(), 100),
        );
        self.out.write_all(&block)
    }

    /// Writes a `././@LongLink` entry carrying a long name (`L`) or link (`K`).
    fn long_entry(&mut self, typeflag: u8, value: &str) -> io::Result<()> {
        let mut data = value.as_bytes().to_vec();
        data.push(0);
        let block = build_header(b"././@LongLink", 0o644, data.len() as u64, 0, typeflag, b"");
        self.out.write_all(&block)?;
        self.out.write_all(&data)?;
        self.pad(data.len() as u64)
    }
}

/// The first `n` bytes of `b`.
fn truncate(b: &[u8], n: usize) -> &[u8] {
    &b[..b.len().min(n)]
}

/// Writes `value` as zero-padded octal into `field`, NUL-terminated.
fn octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(&text.as_bytes()[text.len() - digits..]);
    field[digits] = 0;
}

/// Builds one GNU tar header block.
fn build_header(
    name: &[u8],
    mode: u32,
    size: u64,
    mtime: u64,
    typeflag: u8,
    link: &[u8],
) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name);
    octal(&mut h[100..108], u64::from(mode & 0o7777));
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size < 0o77777777777 {
        octal(&mut h[124..136], size);
    } else {
        // GNU base-256: high bit set, big-endian value in the remaining bytes.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], mtime.min(0o77777777777));
    h[156] = typeflag;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..263].copy_from_slice(b"ustar ");
    h[263..265].copy_from_slice(b" \0");
    h[265..269].copy_from_slice(b"root");
    h[297..301].copy_from_slice(b"root");
    // Checksum: computed with the checksum field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let text = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(text.as_bytes());
    h
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_are_octal_and_checksummed() {
        let h = build_header(b"./a", 0o755, 10, 1_700_000_000, b'0', b"");
        assert_eq!(&h[100..108], b"0000755\0");
        assert_eq!(&h[124..136], b"00000000012\0");
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut copy = h;
        copy[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, copy.iter().map(|&b| u32::from(b)).sum::<u32>());
    }

    #[test]
    fn long_names_use_longlink() {
        let long = format!("./{}", "x".repeat(150));
        let mut w = TarWriter::new(Vec::new(), 0);
        w.file_bytes(&long, 0o644, b"hi").unwrap();
        let out = w.finish().unwrap();
        assert_eq!(&out[..13], b"././@LongLink");
        assert_eq!(out[156], b'L');
        // long-link header + one data block + real header + data block + 2 end blocks
        assert_eq!(out.len(), 512 * 6);
    }
}
